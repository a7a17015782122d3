"""Feature detectors behind one interface (docs/design.md#metrics): a `Detector` takes uint8
images [N, C, H, W] (C = 1 grey, repeated to RGB, or 3) and returns float32
features [N, feature_dim].

- `InceptionDetector` (metric "fid"): the FID Inception-v3, torch-fidelity's
  port of the TensorFlow graph inception-2015-12-05 (2048-d pool features,
  TF1-style bilinear resize to 299x299), with torch-fidelity's weight file.
- `DINOv2Detector` (metric "fd_dinov2"): DINOv2 ViT-L/14 from Hugging Face
  transformers (`Dinov2Model`, 1024-d class token after the final norm), fed
  as docs/design.md#metrics says: bicubic antialiased resize to 224 on 0-255 floats, /255,
  ImageNet mean/std.
- `ClassifierDetector` (metric "fd_classifier"): the penultimate features of a
  small CNN classifier you train on a labelled split of your own domain
  (`edm2.metrics.classifier.train_classifier`, `edm2 metrics classifier`),
  read from `<detector_dir>/classifier.safetensors`; never downloaded.
- `TinyDetector` (metric "fd_tiny"): a cheap, fixed, seeded stand-in with the
  same interface, for smoke tests of the pipeline. It is not a metric to
  report.

Weights are looked up in one folder (`detector_dir`): the argument /
`--detector-dir`, else $EDM2_DETECTOR_DIR, else ~/.cache/edm2/detectors.
Where a network is reachable they are downloaded on first use; offline a
missing file raises FileNotFoundError naming it and where to put it.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import os
import sys
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save

from ..io.download import cache_dir, download_file
from ..utils.errors import EDM2Error, MissingFileError
from ..utils.fileio import atomic_write_bytes
from ..utils.validate import safe_error_text

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
DINOV2_FOLDER = "dinov2-large"          # <detector_dir>/dinov2-large/{config.json, model.safetensors}
DINOV2_HUB = "facebook/dinov2-large"    # its Hugging Face hub name (ViT-L/14)
# facebook/dinov2-large's architecture (for random initialisation without a download).
DINOV2_VITL14 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                     image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True, use_swiglu_ffn=False)


def detector_dir(path=None) -> Path:
    """Folder holding the detector weights: `path`, else $EDM2_DETECTOR_DIR, else the cache's
    `detectors` folder (`edm2.io.download.cache_dir`: $EDM2_CACHE/detectors, by default ~/.cache/edm2/detectors)."""
    if path is not None:
        return Path(path)
    env = os.environ.get("EDM2_DETECTOR_DIR")
    return Path(env) if env else cache_dir("detectors")


def _offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("EDM2_OFFLINE", "HF_HUB_OFFLINE"))


class Detector(torch.nn.Module):
    """uint8 images [N, 1 or 3, H, W] -> float32 features [N, feature_dim]."""

    metric = ""
    feature_dim = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise EDM2Error(f"{type(self).__name__}: expected uint8 images [N, 1 or 3, H, W], got "
                             f"{images.dtype} {list(images.shape)}")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # grayscale -> RGB
        with torch.no_grad():
            return self.features(images).to(torch.float32)

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Inception-v3 (FID)
# ---------------------------------------------------------------------------

def _torch_fidelity_inception():
    """torch-fidelity's FeatureExtractorInceptionV3 class.

    The module itself needs only torch, but the package's __init__ also imports
    its CLIP/VGG/dataset code, which needs torchvision (not installable beside
    a CPU torch from PyPI). Without torchvision we register the package as a
    bare namespace (no __init__ run) and import just the Inception module."""
    if "torch_fidelity" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            raise EDM2Error("FID needs torch-fidelity: pip install --no-deps torch-fidelity==0.4.0 "
                               "(or `make venv`, which installs it)")
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3
    except ImportError as e:
        raise EDM2Error(f"FID needs torch-fidelity ({e}): pip install --no-deps torch-fidelity==0.4.0") from None


class InceptionDetector(Detector):
    """FID Inception-v3 (TF inception-2015-12-05 graph, torch-fidelity's port).

    state_dict: the weights (torch-fidelity's file, read with
    `torch.load(..., weights_only=True)` by `load_detector`), or None to keep
    PyTorch's random initialisation (tests, benchmarks)."""

    metric = "fid"
    feature_dim = 2048

    def __init__(self, state_dict: dict | None = None):
        super().__init__()
        base = _torch_fidelity_inception()

        class _Net(base):
            # The library's constructor loads weights with an unrestricted torch.load; we hand it a tiny
            # buffer holding None (skipped below) and load the real weights ourselves, tensors only.
            def load_state_dict(self, state, *args, **kwargs):
                return None if state is None else super().load_state_dict(state, *args, **kwargs)

        buf = io.BytesIO()
        torch.save(None, buf)
        buf.seek(0)
        self.net = _Net("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
        if state_dict is not None:
            self.net.load_state_dict(state_dict, strict=True)

    def features(self, rgb):
        return self.net(rgb)[0]


def _load_inception(folder: Path, download: bool, device) -> InceptionDetector:
    path = folder / INCEPTION_FILE
    hub_copy = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE  # where torch-fidelity caches it
    if not path.is_file() and hub_copy.is_file():
        path = hub_copy
    why = ""
    if not path.is_file() and download and not _offline():
        try:
            download_file(INCEPTION_URL, path, progress=True)  # temp file + rename
        except Exception as e:
            why = f"; downloading {INCEPTION_URL} failed ({type(e).__name__})"
    if not path.is_file():
        raise MissingFileError(f"FID weights {path} not found{why}: download {INCEPTION_URL} on a machine with "
                                f"network access and put it at {path} (the folder is `detector_dir` or "
                                f"$EDM2_DETECTOR_DIR)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return InceptionDetector(state).to(device)
    except Exception as e:
        raise EDM2Error(f"{path}: not torch-fidelity's Inception-v3 weight file ({safe_error_text(e)}); "
                         f"delete it and download {INCEPTION_URL} again") from None


# ---------------------------------------------------------------------------
# DINOv2 ViT-L/14 (FD_DINOv2)
# ---------------------------------------------------------------------------

class DINOv2Detector(Detector):
    """DINOv2 ViT-L/14 class token (1024-d) with the preprocessing of docs/design.md#metrics.

    model: a transformers `Dinov2Model`; None builds facebook/dinov2-large's
    architecture with random weights."""

    metric = "fd_dinov2"
    feature_dim = 1024
    resolution = 224

    def __init__(self, model=None):
        super().__init__()
        if model is None:
            model = _random_dinov2()
        self.model = model.eval().requires_grad_(False)
        self.feature_dim = int(model.config.hidden_size)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1), persistent=False)

    def features(self, rgb):
        x = rgb.to(torch.float32)
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", antialias=True)  # no clamp
        x = (x / 255 - self.mean) / self.std
        return self.model(pixel_values=x).pooler_output  # = final layernorm of the class token


def _random_dinov2(config: dict = DINOV2_VITL14):
    """Dinov2Model of the given architecture with random weights, initialised
    like transformers does (N(0, 0.02) matrices and embeddings, LayerNorm 1/0,
    zero biases, layer scales 1) but without its slow truncated normal: the
    model is built on the meta device and filled in place (seed with torch.manual_seed)."""
    from transformers import Dinov2Config, Dinov2Model  # optional (edm2[metrics]) and slow to import

    with torch.device("meta"):
        model = Dinov2Model(Dinov2Config(**config))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
            elif name.endswith("lambda1"):
                p.fill_(model.config.layerscale_value)
            elif name.endswith("weight"):
                p.fill_(1)
            else:
                p.zero_()
    return model


def _load_dinov2(folder: Path, download: bool, device) -> DINOv2Detector:
    from transformers import Dinov2Model  # optional (edm2[metrics]) and slow to import

    local = folder / DINOV2_FOLDER
    how = (f"on a machine with network access run `hf download {DINOV2_HUB} --local-dir {DINOV2_FOLDER}` "
           f"(or Dinov2Model.from_pretrained('{DINOV2_HUB}').save_pretrained('{DINOV2_FOLDER}')) and copy that "
           f"folder to {local} (the parent is `detector_dir` or $EDM2_DETECTOR_DIR)")
    if local.exists():
        missing = [n for n in ("config.json", "model.safetensors") if not (local / n).is_file()]
        if missing:
            raise MissingFileError(f"FD_DINOv2 weights: {local / missing[0]} is missing; {how}")
        try:
            model = Dinov2Model.from_pretrained(str(local), local_files_only=True)
        except Exception as e:
            raise EDM2Error(f"{local}: not a DINOv2 model folder ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); {how}") from None
    else:
        try:  # the Hugging Face cache ($HF_HOME), downloading into it unless offline
            model = Dinov2Model.from_pretrained(DINOV2_HUB, local_files_only=not download or _offline())
        except Exception as e:
            raise MissingFileError(f"FD_DINOv2 weights: {local} not found and {DINOV2_HUB} is not in the Hugging "
                                    f"Face cache{'' if download and not _offline() else ' (offline)'} "
                                    f"({type(e).__name__}); {how}") from None
    if model.config.hidden_size != 1024 or model.config.patch_size != 14:
        raise EDM2Error(f"{local}: hidden size {model.config.hidden_size} / patch {model.config.patch_size}; "
                         f"FD_DINOv2 is defined with ViT-L/14 (1024 / 14)")
    return DINOv2Detector(model).to(device)


# ---------------------------------------------------------------------------
# A classifier of your own (metric "fd_classifier"; trained by edm2.metrics.classifier)
# ---------------------------------------------------------------------------

CLASSIFIER_FILE = "classifier.safetensors"   # looked up in the detector folder for metric "fd_classifier"
_CLASSIFIER_FORMAT = "edm2-classifier-v1"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture: three stages of two 3x3 conv + BatchNorm + ReLU at widths
    `widths`, 2x2 max-pooling between them, global average pooling, one hidden
    layer of `feature_dim` units (the features) and the class logits. Inputs
    are resized to `resolution` and scaled to [-1, 1]."""
    img_channels: int = 1
    resolution: int = 32
    num_classes: int = 10
    widths: tuple = (8, 16, 32)
    feature_dim: int = 128


class Classifier(torch.nn.Module):
    """The CNN of `ClassifierConfig`. `features(x)` -> [N, feature_dim], `forward(x)` -> logits."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers, c = [], config.img_channels
        for i, w in enumerate(config.widths):
            if i:
                layers.append(torch.nn.MaxPool2d(2))
            for _ in range(2):
                layers += [torch.nn.Conv2d(c, w, 3, padding=1, bias=False), torch.nn.BatchNorm2d(w),
                           torch.nn.ReLU(inplace=True)]
                c = w
        self.body = torch.nn.Sequential(*layers)
        self.hidden = torch.nn.Linear(c, config.feature_dim)
        self.head = torch.nn.Linear(config.feature_dim, config.num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] (C = 1 or 3) -> float in [-1, 1] at the classifier's channels and resolution."""
        x = images.to(torch.float32)
        if x.shape[1] != self.config.img_channels:
            if self.config.img_channels == 1:
                x = x.mean(dim=1, keepdim=True)   # RGB (or grey repeated to RGB) -> grey, exact for repeated grey
            else:
                x = x.expand(-1, self.config.img_channels, -1, -1)
        if x.shape[-1] != self.config.resolution or x.shape[-2] != self.config.resolution:
            x = F.interpolate(x, size=(self.config.resolution,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)
        return x / 127.5 - 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.hidden(self.body(x).mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ClassifierDetector(Detector):
    """The metrics pipeline's view of a `Classifier`: uint8 images -> its features."""

    metric = "fd_classifier"

    def __init__(self, classifier: Classifier | None = None, meta: dict | None = None,
                 weights_sha256: str | None = None):
        super().__init__()
        self.classifier = (classifier if classifier is not None else Classifier(ClassifierConfig())).eval()
        self.feature_dim = self.classifier.config.feature_dim
        self.meta = dict(meta or {})
        self._sha256 = weights_sha256

    @property
    def weights_sha256(self) -> str:
        """Which classifier this is: the sha256 of the classifier.safetensors file it was read from
        (`sha256sum classifier.safetensors`), or, for one built in memory, of its weights serialised
        as safetensors without metadata. Reference statistics record it (`edm2.metrics.evaluate.save_ref`)."""
        if self._sha256 is None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.classifier.state_dict().items()}
            return hashlib.sha256(save(state)).hexdigest()
        return self._sha256

    def features(self, rgb):
        return self.classifier.features(self.classifier.prepare(rgb))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class indices [N] of uint8 images [N, 1 or 3, H, W]."""
        with torch.no_grad():
            return self.classifier(self.classifier.prepare(images)).argmax(dim=1)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

def save_classifier(path, classifier: Classifier, info: dict) -> Path:
    """Write `classifier` (weights + architecture + `info`) to `path`, atomically."""
    meta = {"format": _CLASSIFIER_FORMAT, "config": json.dumps(asdict(classifier.config)), "info": json.dumps(info)}
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    return atomic_write_bytes(path, save(state, metadata=meta))


def load_classifier(path, device="cpu") -> ClassifierDetector:
    """Read a file written by `train_classifier` (safetensors; nothing in it is executed)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no classifier there; train one with `edm2 metrics classifier "
                                f"--data LABELLED_DATASET --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad files
        raise EDM2Error(f"{path}: not a readable safetensors file ({type(e).__name__}); "
                         f"train a classifier with `edm2 metrics classifier`") from None
    if meta.get("format") != _CLASSIFIER_FORMAT:
        raise EDM2Error(f"{path}: not an edm2 classifier (format {meta.get('format')!r}); "
                         f"train one with `edm2 metrics classifier`")
    raw = json.loads(meta["config"])
    config = ClassifierConfig(**{**raw, "widths": tuple(raw["widths"])})
    classifier = Classifier(config)
    try:
        classifier.load_state_dict(state)
    except RuntimeError:
        raise EDM2Error(f"{path}: its tensors do not match its recorded architecture; the file is damaged") from None
    return ClassifierDetector(classifier.to(device), json.loads(meta.get("info", "{}")), file_sha256(path))


def file_sha256(path) -> str:
    """sha256 of a file's bytes (read in chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def detector_record(metric: str, detector) -> dict:
    """What reference statistics record about the detector of `metric`: its name, and for
    "fd_classifier" (a network of your own, so not fixed by its name) the sha256 of its weights."""
    record = {"name": metric}
    if metric == "fd_classifier":
        record["sha256"] = detector.weights_sha256
    return record


def _load_for_metric(folder: Path, download: bool, device) -> ClassifierDetector:
    """Loader of metric "fd_classifier" (edm2.metrics.detectors.DETECTORS): never downloads."""
    return load_classifier(Path(folder) / CLASSIFIER_FILE, device)



# ---------------------------------------------------------------------------
# Stand-in for tests
# ---------------------------------------------------------------------------

class TinyDetector(Detector):
    """A fixed random feature map for smoke tests (not a published metric):
    bilinear resize to 32x32, /127.5 - 1, one seeded 4x4/stride-4 conv with
    `feature_dim // 2` filters, ReLU, then the spatial mean and standard
    deviation of each filter -> `feature_dim` features."""

    metric = "fd_tiny"

    def __init__(self, feature_dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.feature_dim = 2 * (feature_dim // 2)
        self.register_buffer("weight", torch.randn([feature_dim // 2, 3, 4, 4], generator=g) / 7)

    def features(self, rgb):
        x = F.interpolate(rgb.to(torch.float32), size=(32, 32), mode="bilinear", antialias=True) / 127.5 - 1
        y = F.relu(F.conv2d(x, self.weight.to(x.device), stride=4)).flatten(2)
        return torch.cat([y.mean(2), y.std(2)], dim=1)


# metric name -> (detector class, loader(folder, download, device))
DETECTORS = {
    "fid": (InceptionDetector, _load_inception),
    "fd_dinov2": (DINOv2Detector, _load_dinov2),
    "fd_classifier": (ClassifierDetector, _load_for_metric),
    "fd_tiny": (TinyDetector, lambda folder, download, device: TinyDetector().to(device)),
}


def _check_metric(metric):
    if metric not in DETECTORS:
        raise EDM2Error(f"metric={metric!r}: unknown; choose from fid, fd_dinov2, fd_classifier "
                         f"(fd_tiny is a test stand-in)")


def load_detector(metric: str, weights_dir=None, device="cpu", download: bool = True) -> Detector:
    """The detector of `metric` ("fid", "fd_dinov2", "fd_classifier" or "fd_tiny") with its
    published weights from `detector_dir(weights_dir)` (downloaded there on
    first use unless `download=False` or $EDM2_OFFLINE / $HF_HUB_OFFLINE is set),
    in eval mode on `device`."""
    _check_metric(metric)
    return DETECTORS[metric][1](detector_dir(weights_dir), download, torch.device(device)).eval()


def random_detector(metric: str, seed: int = 0, device="cpu") -> Detector:
    """The detector's real architecture with random weights (seeded), for tests and timing."""
    _check_metric(metric)
    torch.manual_seed(seed)
    return DETECTORS[metric][0]().to(device).eval()
