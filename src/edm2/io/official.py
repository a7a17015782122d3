"""Safe import of the authors' published EDM2 files (docs/published-models.md).

NVIDIA publishes its EDM2 models (post-hoc reconstructions such as
`edm2-img512-s-2147483-0.130.pkl`, raw training snapshots such as
`network-snapshot-0134217-0.050.pkl`) and its reference statistics
(`dataset-refs/img512.pkl`) as Python pickles. Loaded the usual way, such a
pickle imports the authors' `dnnlib`/`torch_utils` packages and *executes the
Python source code stored inside the file*. We never do that:

- `safe_unpickle` reads a pickle with an explicit allow-list of globals (the
  table `_ALLOWED` below: torch's tensor rebuild functions, OrderedDict, numpy
  array reconstruction, the authors' EasyDict taken as a plain dict, and the
  authors' persistence hook). Any other global (`os.system`, `builtins.eval`,
  an unknown module, ...) stops the load with `UnsafePickleError` naming it,
  before it can be called: the unpickler resolves a global before it can
  call it, and refuses at that point.
- The persistence hook `torch_utils.persistence._reconstruct_persistent_obj(meta)`
  is replaced by a function returning a plain `Record` (class name + state);
  the module source in `meta['module_src']` is dropped, never run or imported.
- Storages come as `torch.storage._load_from_bytes(blob)`, `blob` being a
  legacy `torch.save` stream; it is read with `torch.load(weights_only=True)`,
  torch's own restricted loader.

The records are then mapped onto our `edm2.nn.Precond` (architecture from the
`_init_kwargs` the authors' persistence wrapper stores, weights loaded
strictly) and our snapshot metadata (`edm2.io.snapshot.make_meta`). Published fp16
weights and buffers are widened to float32 (exact: every fp16 value is a
float32 value). `edm2.io.loading.load_network` routes every `.pkl` path or URL
here, so generation, metrics, post-hoc EMA and `train --init` accept them.
"""
from __future__ import annotations

import collections
import hashlib
import inspect
import io
import os
import pickle
import re
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..encoders import StabilityVAEEncoder, StandardRGBEncoder
from ..nn import Block, Precond, UNet, build_network, precision_kwargs
from ..nn.hub import state_mismatch
from ..utils.errors import EDM2Error, ExistingFileError, MissingFileError
from ..utils.validate import safe_error_text
from .download import cache_dir, fetch, is_url
from .snapshot import make_meta, save_snapshot, snapshot_name

__all__ = ["load_official", "import_official", "convert_official_folder", "load_reference_stats",
           "safe_unpickle", "UnsafePickleError", "OfficialFormatError"]


class UnsafePickleError(EDM2Error):
    """The pickle asks for a global that is not on the allow-list; nothing was run."""


class OfficialFormatError(EDM2Error):
    """The file is a pickle, but not one of the authors' EDM2 networks/statistics."""


# ---------------------------------------------------------------------------
# The restricted unpickler.
# ---------------------------------------------------------------------------

@dataclass
class Record:
    """A pickled object of one of the authors' classes, as plain data: its class
    name and its state (the object's `__dict__`: for torch modules `_parameters`,
    `_buffers`, `_modules`, `_init_kwargs`, ...). Nothing of the class is run."""

    class_name: str = ""
    state: dict = field(default_factory=dict, repr=False)

    def __setstate__(self, state):  # BUILD opcode (used for torch.nn.ModuleDict below)
        self.state = dict(state or {})


class _ModuleDictRecord(Record):
    """`torch.nn.ModuleDict` (the U-Net's `enc`/`dec`) is pickled as NEWOBJ + BUILD
    of torch's own class; we build a Record from it instead of a live module."""

    def __init__(self, *args):
        super().__init__("ModuleDict", {})

    def __new__(cls, *args):  # NEWOBJ calls cls.__new__(cls); give the fields their defaults
        obj = super().__new__(cls)
        obj.class_name, obj.state = "ModuleDict", {}
        return obj


class _EasyDict(dict):
    """Stands in for `dnnlib.util.EasyDict`: a plain dict (a subclass only so that a
    BUILD opcode with an instance dict, if a pickler wrote one, is accepted)."""


def _persistent_record(meta):
    """Replacement of `torch_utils.persistence._reconstruct_persistent_obj`.
    Keeps the class name and state; drops `module_src` unread."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("malformed persistent-object record (expected type 'class' and a class_name)")
    state = meta.get("state")
    if state is not None and not isinstance(state, dict):
        raise pickle.UnpicklingError(f"persistent object {meta['class_name']}: state is not a dict")
    return Record(meta["class_name"], dict(state or {}))


def _storage_from_bytes(blob):
    """Replacement of `torch.storage._load_from_bytes`: the blob is a (legacy)
    torch.save stream of one storage; torch's weights-only loader reads it."""
    if not isinstance(blob, (bytes, bytearray)):
        raise pickle.UnpicklingError("storage payload is not bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation notices
        return torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")


def _safe_dtype(*args):
    """numpy.dtype, refusing object dtypes (whose arrays would hold arbitrary objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError(f"numpy object dtype {dtype} is not allowed")
    return dtype


def _numpy_core():
    try:
        return np._core.multiarray  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        return np.core.multiarray


# (module, name) as written in the pickle -> what we hand to the unpickler instead.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictRecord,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x / 2.x spellings
    _ALLOWED[(_mod, "_reconstruct")] = _numpy_core()._reconstruct
    _ALLOWED[(_mod, "scalar")] = _numpy_core().scalar


# Globals that a pickle of plain numpy arrays needs (e.g. the CIFAR python batches, read by edm2.data).
NUMPY_ARRAY_GLOBALS = {k: v for k, v in _ALLOWED.items() if k[0].startswith("numpy")}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, where, allowed=None, refusal=None, **kwargs):
        super().__init__(file, **kwargs)
        self.where = where
        self.allowed = _ALLOWED if allowed is None else allowed
        self.refusal = refusal or ("edm2's allow-list for the authors' EDM2 files; nothing from the file was run. "
                                   "Only NVIDIA's published EDM2 network/statistics pickles can be read")

    def find_class(self, module, name):
        # Every global the pickle names passes through here before it can be called.
        target = self.allowed.get((module, name))
        if target is None:
            raise UnsafePickleError(
                f"{self.where}: refused: the pickle asks for the global '{module}.{name}', which is not on "
                f"{self.refusal}")
        return target

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not used by the published EDM2 pickles")


def safe_unpickle(source, where=None):
    """Unpickle bytes or a binary file with the allow-list above -> plain data
    (dicts, lists, tensors, numpy arrays, `Record`s). Raises UnsafePickleError
    for a global outside the allow-list, OfficialFormatError for a broken file."""
    where = where or getattr(source, "name", "<pickle>")
    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        return _RestrictedUnpickler(f, where).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated file, wrong format, malformed records, ...
        raise OfficialFormatError(f"{where}: not a readable pickle of the authors' EDM2 format "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def unpickle_numpy_data(data: bytes, where: str, refusal: str):
    """Unpickle a pickle that holds only builtin containers, numbers, strings
    and numpy arrays (allow-list NUMPY_ARRAY_GLOBALS; no object dtypes), as
    Python 2 wrote them (8-bit strings read as latin-1 text). Raises
    UnsafePickleError naming any other global (nothing is run), ValueError for
    a broken pickle."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), where, NUMPY_ARRAY_GLOBALS, refusal, encoding="latin1").load()
    except UnsafePickleError:
        raise
    except Exception as e:
        raise EDM2Error(f"{where}: not a readable pickle ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _unpickle_file(path: Path):
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        return safe_unpickle(f, where=str(path))


# ---------------------------------------------------------------------------
# Mapping the records onto our network and snapshot metadata.
# ---------------------------------------------------------------------------

# The authors' file names end in -<kimg>-<sigma_rel>.pkl (both post-hoc
# reconstructions and raw snapshots).
_NAME_RE = re.compile(r"(.*)-(\d+)-(\d+\.\d+)\.pkl$")


def kimg_to_nimg(kimg: int) -> int:
    """The authors name files by kimg = nimg // 1000 of a multiple of 1024 images;
    recover nimg exactly (docs/design.md#post-hoc-reconstruction)."""
    return (int(kimg) * 1000 + 999) // 1024 * 1024


def parse_official_name(name) -> tuple[str, int, float] | None:
    """'edm2-img512-s-2147483-0.130.pkl' -> ('edm2-img512-s', 2147483648, 0.13); None if not such a name."""
    m = _NAME_RE.fullmatch(os.path.basename(urllib.parse.urlsplit(str(name)).path if is_url(name) else str(name)))
    if not m:
        return None
    return m.group(1), kimg_to_nimg(int(m.group(2))), float(m.group(3))


def _precond_kwargs_allowed() -> set:
    """Keyword arguments our Precond accepts (its own, the U-Net's, the blocks')."""
    per_block = {"in_channels", "out_channels", "emb_channels", "flavor", "resample_mode", "attention"}
    names = set()
    for cls in (Precond, UNet, Block):
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self" and p.name not in per_block:
                names.add(p.name)
    return names


def _jsonable(value, where):
    """Plain JSON data from unpickled constructor arguments (tuples -> lists, numpy scalars -> numbers)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise OfficialFormatError(f"{where}: unexpected value of type {type(value).__name__} in the stored arguments")


def _net_kwargs(record: Record, where) -> dict:
    """Precond keyword arguments from the record's `_init_kwargs` (and `_init_args`)."""
    st = record.state
    kwargs = dict(st.get("_init_kwargs") or {})
    positional = ("img_resolution", "img_channels", "label_dim")
    for name, value in zip(positional, st.get("_init_args") or ()):
        kwargs.setdefault(name, value)
    for name in positional:  # Precond keeps these as attributes too
        if name not in kwargs and name in st:
            kwargs[name] = st[name]
    missing = [n for n in positional if n not in kwargs]
    if missing:
        raise OfficialFormatError(f"{where}: the network record lacks {', '.join(missing)} in its _init_kwargs")
    unknown = sorted(set(kwargs) - _precond_kwargs_allowed())
    if unknown:
        raise OfficialFormatError(f"{where}: the network was built with arguments edm2's Precond does not know: "
                                  f"{', '.join(unknown)}")
    return _jsonable(kwargs, where)


def _tensors_of(record: Record, where, prefix="") -> dict:
    """Flatten a module record into a state dict (parameters, persistent buffers, sub-modules)."""
    st = record.state
    skip = set(st.get("_non_persistent_buffers_set") or ())
    out = {}
    for kind in ("_parameters", "_buffers"):
        for name, t in (st.get(kind) or {}).items():
            if t is None or name in skip:
                continue
            if not isinstance(t, torch.Tensor):
                raise OfficialFormatError(f"{where}: {prefix}{name} is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t
    for name, sub in (st.get("_modules") or {}).items():
        if sub is None:
            continue
        if not isinstance(sub, Record):
            raise OfficialFormatError(f"{where}: sub-module {prefix}{name} is a {type(sub).__name__}")
        out.update(_tensors_of(sub, where, f"{prefix}{name}."))
    return out


def _encoder_meta(record, where) -> dict:
    """Our encoder metadata for the authors' encoder record (None: pixels, their default)."""
    if record is None or (isinstance(record, Record) and record.class_name == "StandardRGBEncoder"):
        return StandardRGBEncoder().to_meta()
    if not isinstance(record, Record) or record.class_name != "StabilityVAEEncoder":
        name = record.class_name if isinstance(record, Record) else type(record).__name__
        raise OfficialFormatError(f"{where}: unknown encoder {name}; known: StabilityVAEEncoder, StandardRGBEncoder")
    st, kw = record.state, dict(record.state.get("_init_kwargs") or {})
    final_mean = float(kw.get("final_mean", 0.0))
    final_std = float(kw.get("final_std", 0.5))
    if "raw_mean" in kw and "raw_std" in kw:
        raw_mean, raw_std = kw["raw_mean"], kw["raw_std"]
    else:  # invert scale = final_std / raw_std, bias = final_mean - raw_mean * scale (App. B.1)
        scale = np.asarray(st["scale"], np.float64).ravel()
        bias = np.asarray(st["bias"], np.float64).ravel()
        raw_std = final_std / scale
        raw_mean = (final_mean - bias) / scale
    vae_name = st.get("vae_name", kw.get("vae_name", "stabilityai/sd-vae-ft-mse"))
    raw_mean = [round(float(v), 6) for v in np.ravel(raw_mean)]  # the authors' constants have 2-3 decimals
    raw_std = [round(float(v), 6) for v in np.ravel(raw_std)]
    return StabilityVAEEncoder(vae_name, raw_mean, raw_std, final_mean, final_std).to_meta()


def _dataset_meta(net_kwargs, encoder, dataset_kwargs, where) -> dict:
    latent = encoder.get("type") == "sd-vae"
    return {"resolution": net_kwargs["img_resolution"], "channels": 8 if latent else net_kwargs["img_channels"],
            "label_dim": net_kwargs["label_dim"], "class_names": None,
            "official_kwargs": _jsonable(dict(dataset_kwargs or {}), where)}


def load_official(source, device="cpu", name_hint: str | None = None):
    """Load one of the authors' network pickles (path or URL) safely ->
    (Precond in eval mode, snapshot metadata as `edm2.io.snapshot.make_meta`).

    nimg and sigma_rel come from the file name (`...-<kimg>-<sigma_rel>.pkl`), or
    from `name_hint` (an original name, if the file was renamed)."""
    path = fetch(source)
    where = str(source)
    data = _unpickle_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("ema"), Record) or data["ema"].class_name != "Precond":
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise OfficialFormatError(f"{where}: not an EDM2 network pickle (expected a dict whose 'ema' is a Precond "
                                  f"record; found {keys})")
    record = data["ema"]
    net_kwargs = _net_kwargs(record, where)
    tensors = _tensors_of(record, where)
    try:
        with torch.device("meta"):
            net = build_network("G", **precision_kwargs(net_kwargs))
    except (TypeError, ValueError) as e:
        raise OfficialFormatError(f"{where}: cannot build the network from its stored arguments: {e}") from None
    # fp16 (as published) -> float32: exact widening of every parameter and buffer.
    state = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()) for k, v in tensors.items()}
    problem = state_mismatch(net, state)
    if problem:
        raise OfficialFormatError(f"{where}: weights do not match the architecture of its _init_kwargs ({problem})")
    net.load_state_dict(state, strict=True, assign=True)
    net = net.to(device).eval().requires_grad_(False)

    encoder = _encoder_meta(data.get("encoder"), where)
    parsed = parse_official_name(name_hint or str(source))  # (0, None) for a name not in the authors' scheme
    nimg, sigma_rel = (parsed[1], parsed[2]) if parsed else (0, None)
    loss = data.get("loss_fn")
    origin = {"importer": "edm2.io.official", "source": where,
              "source_dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "") if tensors else None,
              "loss": _jsonable({k: v for k, v in loss.state.items() if k in ("P_mean", "P_std", "sigma_data")}, where)
              if isinstance(loss, Record) else None}
    dataset = _dataset_meta(net_kwargs, encoder, data.get("dataset_kwargs"), where)
    meta = make_meta(net_kwargs, nimg, sigma_rel, encoder, dataset, origin)
    return net, meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def import_official(src, dest, dtype: str = "fp32", name_hint: str | None = None) -> Path:
    """Convert a published pickle (path or URL) into an edm2 snapshot file.

    `dest`: a `.safetensors` file, or an existing folder (the file is then named
    by `edm2.io.snapshot.snapshot_name(nimg, sigma_rel)`). Never overwrites.
    `dtype`: 'fp32' (default; the published fp16 values widened exactly) or
    'fp16' (parameters stored as published, half the size; loading widens them).
    Returns the written path."""
    if dtype not in _DTYPES:
        raise EDM2Error(f"dtype={dtype!r}: allowed: {', '.join(_DTYPES)}")
    dest = Path(dest)
    if not dest.is_dir() and dest.suffix != ".safetensors":
        raise EDM2Error(f"dest={dest}: must be a .safetensors file or an existing folder")
    if dest.is_file():
        raise ExistingFileError(f"dest={dest}: already exists; choose another `dest` or remove it")
    net, meta = load_official(src, name_hint=name_hint)
    meta["origin"]["sha256"] = _sha256(fetch(src))  # provenance of the converted file (cached if a URL)
    if dest.is_dir():
        dest = dest / snapshot_name(meta["nimg"], meta["ema_std"])
        if dest.exists():
            raise ExistingFileError(f"dest={dest}: already exists; choose another `dest` or remove it")
    meta["origin"]["stored_dtype"] = dtype
    save_snapshot(dest, net, meta, dtype=_DTYPES[dtype])
    return dest


def list_official_pickles(folder) -> list[tuple[int, float, Path]]:
    """The authors' `*-<kimg>-<sigma_rel>.pkl` files in a folder -> [(nimg, sigma_rel, path)], sorted."""
    out = []
    for p in Path(folder).iterdir():
        parsed = parse_official_name(p.name)
        if parsed and p.is_file():
            out.append((parsed[1], parsed[2], p))
    return sorted(out, key=lambda r: (r[0], r[1]))


def convert_official_folder(folder, dest=None, dtype: str = "fp16", progress: bool = True) -> Path:
    """Convert a folder of the authors' raw snapshots (`network-snapshot-0134217-0.050.pkl`, ...)
    into edm2 snapshots, for post-hoc EMA reconstruction. By default the parameters stay
    fp16 as published (lossless, half the size of float32; loading widens them). `dest` defaults
    to a folder in the cache named after the source folder. Files converted before are skipped. Returns the folder."""
    folder = Path(folder)
    pkls = list_official_pickles(folder) if folder.is_dir() else []
    if not pkls:
        raise MissingFileError(f"{folder}: no files named like network-snapshot-<kimg>-<sigma_rel>.pkl")
    if dest is None:
        key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
        dest = cache_dir("downloads") / "converted" / f"{folder.resolve().name}-{key}"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for nimg, sigma_rel, path in tqdm(pkls, desc="converting published snapshots", unit="file", disable=not progress):
        if not (dest / snapshot_name(nimg, sigma_rel)).exists():
            import_official(path, dest, dtype=dtype)
    return dest


# ---------------------------------------------------------------------------
# Reference statistics.
# ---------------------------------------------------------------------------

def load_reference_stats(source) -> dict:
    """Reference statistics in the authors' formats (path or URL) ->
    {detector: {'mu': float64 [D], 'sigma': float64 [D, D]}}.

    - EDM2 `dataset-refs/*.pkl`: {'fid': {mu, sigma}, 'fd_dinov2': {mu, sigma}},
      read with the same restricted unpickler as the networks;
    - the older EDM `.npz` (mu, sigma of Inception features): {'fid': {...}}, read
      with numpy's allow_pickle=False."""
    path = fetch(source)
    where = str(source)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {"fid": {k: z[k] for k in ("mu", "sigma") if k in z.files}}
        except (OSError, ValueError) as e:
            raise OfficialFormatError(f"{where}: unreadable .npz ({safe_error_text(e)})") from None
    else:
        data = _unpickle_file(path)
    if not isinstance(data, dict) or not data:
        raise OfficialFormatError(f"{where}: expected a dict of detector -> {{'mu', 'sigma'}}")
    out = {}
    for name, stats in data.items():
        if not isinstance(stats, dict) or "mu" not in stats or "sigma" not in stats:
            raise OfficialFormatError(f"{where}: entry {name!r} lacks 'mu' and 'sigma'")
        mu = np.asarray(stats["mu"], np.float64)
        sigma = np.asarray(stats["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise OfficialFormatError(f"{where}: {name}: mu {list(mu.shape)} / sigma {list(sigma.shape)} "
                                      f"are not [D] and [D, D]")
        out[str(name)] = {"mu": mu, "sigma": sigma}
    return out
