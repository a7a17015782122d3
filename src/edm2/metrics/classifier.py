"""Training and scoring with a classifier of your own as the feature
detector (docs/metrics.md#a-classifier-of-your-own).

FID's Inception network was trained on ImageNet photographs; on 32x32 grey
Fashion-MNIST items its features say little, and its weights may not be at
hand. A small CNN trained on a *labelled, held-out* split of the same domain
gives two numbers that rank models well at that scale:

- **fd_classifier**: the Fréchet distance (the FID formula) between the
  classifier's penultimate-layer features of generated and of real images;
- **class consistency**: for a class-conditional network, the fraction of
  generated images that the classifier assigns to the class they were
  generated for.

`train_classifier` trains one and writes it as one safetensors file with its
architecture in JSON metadata (no pickle); the network, the file reader and
the `ClassifierDetector` that the metrics pipeline loads for "fd_classifier"
(from `<detector_dir>/classifier.safetensors`) live in `edm2.metrics.detectors`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import ImageDataset
from ..generate import generate_images, load_nets
from ..utils.errors import EDM2Error, ExistingFileError
from .detectors import Classifier, ClassifierConfig, ClassifierDetector, save_classifier
from .evaluate import check_ref_detectors, check_ref_resolution, check_ref_stats, distances, gen_seeds
from .stats import FeatureStats

# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------

def _load_all(data, what: str) -> tuple[torch.Tensor, torch.Tensor, ImageDataset]:
    ds = ImageDataset(data)
    if ds.is_latent:
        raise EDM2Error(f"{what}={data}: holds latents; a classifier needs images")
    if ds.raw_labels is None:
        raise EDM2Error(f"{what}={data}: has no class labels; a classifier needs a labelled dataset")
    images = torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))]))
    return images, torch.from_numpy(ds.raw_labels), ds


def evaluate_classifier(detector: ClassifierDetector, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 500) -> float:
    """Top-1 accuracy of `detector` on uint8 `images` with int `labels`."""
    correct = sum(int((detector.predict(images[i:i + batch_size]) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def train_classifier(data, out, val=None, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3,
                     val_fraction: float = 0.05, seed: int = 0, widths=(8, 16, 32), feature_dim: int = 128,
                     overwrite: bool = False, progress: bool = True) -> dict:
    """Train a `Classifier` on the labelled image dataset `data` and write it to `out`.

    Adam with a cosine-decayed learning rate, random x-flips. The accuracy is
    measured on `val` (another labelled dataset) or else on a held-out
    `val_fraction` of `data`, and recorded in the file. Returns the info dict
    (accuracy, counts, source). `out` is never overwritten unless `overwrite`.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExistingFileError(f"out={out}: exists; choose another file or pass overwrite=True")
    if epochs < 1 or batch_size < 1 or not (math.isfinite(lr) and lr > 0):
        raise EDM2Error(f"epochs={epochs}, batch_size={batch_size}, lr={lr}: each must be positive")
    images, labels, ds = _load_all(data, "data")
    g = torch.Generator().manual_seed(seed)
    if val is not None:
        val_images, val_labels, _ = _load_all(val, "val")
    else:
        if not 0 < val_fraction < 1:
            raise EDM2Error(f"val_fraction={val_fraction}: must be between 0 and 1")
        order = torch.randperm(len(images), generator=g)
        n_val = max(1, int(len(images) * val_fraction))
        val_images, val_labels = images[order[:n_val]], labels[order[:n_val]]
        images, labels = images[order[n_val:]], labels[order[n_val:]]
    num_classes = int(max(labels.max(), val_labels.max())) + 1
    config = ClassifierConfig(img_channels=ds.num_channels, resolution=ds.resolution, num_classes=num_classes,
                              widths=tuple(widths), feature_dim=feature_dim)
    torch.manual_seed(seed)
    classifier = Classifier(config)
    opt = torch.optim.Adam(classifier.parameters(), lr=lr)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    bar = tqdm(total=steps, desc="classifier", disable=not progress)
    for _ in range(epochs):
        classifier.train()
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), batch_size):
            idx = order[i:i + batch_size]
            x = classifier.prepare(images[idx])
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(classifier(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    detector = ClassifierDetector(classifier.eval())
    info = {"accuracy": evaluate_classifier(detector, val_images, val_labels), "train_images": len(images),
            "val_images": len(val_images), "data": str(data), "val": str(val) if val is not None else None,
            "epochs": epochs, "seed": seed, "class_names": ds.class_names}
    save_classifier(out, classifier, info)
    return info


def class_consistency(detector: ClassifierDetector, images: torch.Tensor, classes: torch.Tensor) -> float:
    """Fraction of uint8 `images` that `detector` assigns to the class index in `classes`."""
    return float((detector.predict(images) == classes.to(torch.int64)).to(torch.float64).mean())


def classifier_scores(net, ref: dict, detector: ClassifierDetector, num: int = 1000, seed: int = 0,
                      batch_size: int = 100, device=None, progress: bool = True, gnet=None,
                      **sampler_kwargs) -> dict:
    """Generate `num` images of `net` (snapshot, run folder or .pkl) for the seeds of
    `edm2.metrics.evaluate.gen_seeds(num, seed)` in one pass and return
    {"fd_classifier": FD to `ref` (reference statistics with that metric),
     "consistency": class consistency, or None for an unconditional net}.
    `gnet` (loaded like `net`) guides the sampler with `guidance=W` among
    `sampler_kwargs` (classifier-free guidance or autoguidance, as `edm2.generate`)."""
    ref = check_ref_stats(ref)
    if "fd_classifier" not in ref:
        raise EDM2Error("the reference statistics hold no fd_classifier entry; make them with "
                         "`edm2 metrics ref --metrics fd_classifier --detector-dir DIR`")
    check_ref_detectors(ref, {"fd_classifier": detector})
    net, gnet, encoder, _ = load_nets(net, gnet, device)
    stats, hits, total, conditional = FeatureStats(detector.feature_dim), 0, 0, False
    for b in generate_images(net, encoder, gen_seeds(num, seed), gnet=gnet, batch_size=batch_size, device=device,
                             rank=0, world_size=1, progress=progress, **sampler_kwargs):
        if not total:
            check_ref_resolution(ref, int(b.images.shape[-1]), what="generated images")
        with torch.no_grad():  # one pass through the classifier gives the features and the predicted classes
            features = detector.classifier.features(detector.classifier.prepare(b.images))
        stats.append(features)
        if b.classes is not None:
            conditional = True
            hits += int((detector.classifier.head(features).argmax(dim=1) == b.classes).sum())
        total += len(b)
    result = distances({"fd_classifier": stats}, ref)
    result["consistency"] = hits / total if conditional else None
    return result
