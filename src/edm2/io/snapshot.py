"""Self-describing network snapshots: one safetensors file holding the
state dict of a network (any config A-G of the paper's Table 1) plus JSON metadata (key "edm2" of the safetensors
header) with everything needed to rebuild and use the network.

This is the one reader/writer of snapshot files; training, post-hoc EMA,
generation, metrics and import all go through it. Loading never unpickles.
Opening whatever a user names (a run folder, a URL, one of the authors'
published .pkl files) is `edm2.io.loading`'s job; this module is the format only.

Metadata schema (version 1):
    {
      "format": "edm2-snapshot", "version": 1,
      "config": "A".."G",             # the row of the paper's Table 1 (absent: "G")
      "net_kwargs": {...},            # build_network(config, **net_kwargs) rebuilds the network
      "nimg": int,                    # training images seen
      "ema_std": float | null,        # sigma_rel of the EMA profile (null: raw weights or traditional EMA)
      "ema_halflife": float,          # only for a traditional EMA (config A): its half-life in images
      "encoder": {...},               # edm2.encoders.encoder_from_meta() input
      "dataset": {"resolution": R, "channels": C, "label_dim": L,
                  "class_names": [...] | null, ...},
      "origin": {...}                 # provenance: run folder, preset, seed, run_id (run_fingerprint of
                                      # the run's settings), import source, post-hoc EMA record, ...
    }
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..nn import CONFIGS, build_network, precision_kwargs
from ..nn.hub import state_mismatch
from ..utils.errors import EDM2Error
from ..utils.fileio import AtomicWriter, atomic_write_bytes

__all__ = ["save_snapshot", "load_snapshot", "read_snapshot_meta", "list_snapshots", "snapshot_name",
           "make_meta", "SnapshotError"]

FORMAT = "edm2-snapshot"
VERSION = 1
_NAME_RE = re.compile(r"snapshot-(\d{12})-(raw|ema|\d+\.\d+)\.safetensors$")


class SnapshotError(EDM2Error):
    """A file is missing, unreadable, truncated or not an edm2 snapshot."""


def snapshot_name(nimg: int, sigma_rel: float | None, traditional: bool = False) -> str:
    """'snapshot-000008388608-0.050.safetensors': sortable by nimg, then sigma_rel (None: raw weights).
    A traditional EMA (config A) is tagged 'ema'."""
    tag = "ema" if traditional else "raw" if sigma_rel is None else f"{sigma_rel:.3f}"
    return f"snapshot-{nimg:012d}-{tag}.safetensors"


def parse_snapshot_name(name: str):
    """Inverse of snapshot_name -> (nimg, sigma_rel or None), or None if not a snapshot name."""
    m = _NAME_RE.search(os.path.basename(str(name)))
    if not m:
        return None
    return int(m.group(1)), (None if m.group(2) in ("raw", "ema") else float(m.group(2)))


def run_fingerprint(identity: dict) -> str:
    """A short hash of a training run's settings (its config.json: data,
    architecture, optimisation, seed, ...), recorded in every snapshot as
    origin.run_id so that snapshots of different runs are never combined."""
    import hashlib

    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_meta(net_kwargs: dict, nimg: int, sigma_rel, encoder: dict, dataset: dict, origin: dict | None = None,
              config: str = "G", ema_halflife: float | None = None) -> dict:
    """Snapshot metadata (schema in the module docstring); sigma_rel is stored as "ema_std"."""
    meta = {"format": FORMAT, "version": VERSION, "config": config, "net_kwargs": dict(net_kwargs),
            "nimg": int(nimg), "ema_std": None if sigma_rel is None else float(sigma_rel), "encoder": dict(encoder),
            "dataset": dict(dataset), "origin": dict(origin or {})}
    if ema_halflife is not None:
        meta["ema_halflife"] = float(ema_halflife)
    return meta


def snapshot_config(meta: dict) -> str:
    """The config letter (A-G) of a snapshot's network; metadata without one is G."""
    return meta.get("config", "G")


def save_state_dict(path, tensors: dict, meta: dict) -> None:
    """Atomically write tensors + metadata as a snapshot file."""
    _check_meta(meta, path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata={"edm2": json.dumps(meta)}))


def save_snapshot(path, net: torch.nn.Module, meta: dict, dtype: torch.dtype | None = torch.float32) -> None:
    """Save a Precond's state dict (parameters cast to `dtype`, buffers kept) with metadata."""
    params = {name for name, _ in net.named_parameters()}
    state = {}
    for k, v in net.state_dict().items():
        state[k] = v.to(dtype) if (dtype is not None and k in params) else v
    save_state_dict(path, state, meta)


# safetensors' dtype names (the header's "dtype" field) -> torch dtypes, for the dtypes snapshots may hold.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class SnapshotStreamWriter:
    """Write a snapshot piece by piece, without holding it in memory (post-hoc EMA).

    `specs` lists (name, torch dtype, shape) in file order; the header is written
    first, then `write(tensor)` appends the next bytes (whole tensors or row
    blocks, in order). Data goes to a temporary file in the target folder;
    `commit()` checks that every byte arrived, fsyncs and renames it into place;
    `abort()` deletes it. The result is a plain safetensors file, as save_state_dict writes."""

    def __init__(self, path, specs, meta: dict):
        _check_meta(meta, path)
        self.path = Path(path)
        header, offset = {"__metadata__": {"edm2": json.dumps(meta)}}, 0
        for name, dtype, shape in specs:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, like safetensors does
        self.file = AtomicWriter(self.path)  # temp file in the target folder, removed on any failure
        self.tmp = self.file.tmp
        self.file.write(len(text).to_bytes(8, "little") + text)
        self.remaining = offset

    def write(self, data: torch.Tensor) -> None:
        raw = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if raw.nbytes > self.remaining:
            self.abort()
            raise RuntimeError(f"{self.path}: more tensor data than the header declares")
        self.file.write(memoryview(raw))
        self.remaining -= raw.nbytes

    def commit(self) -> Path:
        if self.remaining:
            self.abort()
            raise RuntimeError(f"{self.path}: {self.remaining} bytes of tensor data missing")
        return self.file.commit()

    def abort(self) -> None:
        self.file.abort()


def _check_meta(meta, path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "net_kwargs" not in meta:
        raise SnapshotError(f"{path}: not an edm2 snapshot (metadata lacks format={FORMAT!r} and net_kwargs); "
                            f"convert published .pkl files with `edm2 import-official`")
    if meta.get("version", 0) > VERSION:
        raise SnapshotError(f"{path}: snapshot format version {meta['version']} is newer than this edm2 "
                            f"understands ({VERSION}); upgrade edm2")
    if snapshot_config(meta) not in CONFIGS:
        raise SnapshotError(f"{path}: metadata names config {meta['config']!r}; allowed: {', '.join(CONFIGS)}")


def _is_training_checkpoint(path: Path) -> bool:
    """A `checkpoint-*.pt` of a training run (edm2.train.checkpoint): torch.save's zip
    format, told by its name or its first bytes (nothing of it is loaded)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    return magic == b"PK\x03\x04" and (path.suffix == ".pt" or path.name.startswith("checkpoint-"))


def read_snapshot_meta(path) -> dict:
    """Read only the JSON metadata of a snapshot (cheap: the header only)."""
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"{path}: no such snapshot file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        if _is_training_checkpoint(path):
            raise SnapshotError(f"{path}: this is a training checkpoint (resume state), not a snapshot; pass the "
                                f"run folder or a snapshot-*.safetensors file") from None
        raise SnapshotError(f"{path}: unreadable or truncated snapshot ({type(e).__name__}: {e})") from None
    try:
        meta = json.loads(header["edm2"])
    except (KeyError, ValueError):
        raise SnapshotError(f"{path}: safetensors file without edm2 metadata; not an edm2 snapshot") from None
    _check_meta(meta, path)
    return meta


def load_snapshot(path, device="cpu", eval_mode: bool = True):
    """Load a snapshot -> (Precond, meta). Strict: every key and shape must match."""
    meta = read_snapshot_meta(path)
    if meta.get("net_kwargs") is None:  # written by edm2.ema.trackers.PowerFunctionEMA for a module of the user's
        module = meta.get("origin", {}).get("module", "user-defined module")
        raise SnapshotError(f"{path}: the snapshot holds a {module}, not an edm2 network; load its tensors into that "
                            f"module (edm2.ema.reconstruct_state_dict, safetensors.torch.load_file)")
    net_kwargs = meta["net_kwargs"]
    if not isinstance(net_kwargs, dict):
        raise SnapshotError(f"{path}: metadata net_kwargs is a JSON {type(net_kwargs).__name__}, not an object of "
                            f"constructor arguments; the file was edited or written by another tool")
    try:
        with torch.device("meta"):  # no memory until the file's tensors are assigned
            # older metadata: use_fp16/reduced_dtype, and no config letter (G)
            net = build_network(snapshot_config(meta), **precision_kwargs(net_kwargs))
    except TypeError as e:  # an argument the config's constructor does not take
        if "unexpected keyword argument" not in str(e):
            raise
        raise SnapshotError(f"{path}: metadata net_kwargs do not fit config {snapshot_config(meta)} ({e}); the file "
                            f"was edited or written by another tool") from None
    except EDM2Error as e:  # a value the constructor refuses (sigma_data, dropout, channels, ...)
        raise SnapshotError(f"{path}: metadata net_kwargs: {e}") from None
    try:
        state = load_file(str(path), device=str(device))
    except Exception as e:
        raise SnapshotError(f"{path}: unreadable or truncated snapshot ({type(e).__name__}: {e})") from None
    problem = state_mismatch(net, state)
    if problem:
        raise SnapshotError(f"{path}: weights do not match the architecture in its metadata ({problem})")
    net.load_state_dict(state, strict=True, assign=True)
    for p in net.parameters():
        if p.dtype != torch.float32:
            p.data = p.data.float()
    net.train(not eval_mode).requires_grad_(not eval_mode)
    return net, meta


def list_snapshots(folder) -> list[tuple[int, float | None, Path]]:
    """Snapshot files in a folder named by snapshot_name() -> [(nimg, sigma_rel or None, path)], sorted."""
    out = []
    for p in Path(folder).iterdir():
        parsed = parse_snapshot_name(p.name)
        if parsed is not None and p.is_file():
            out.append((parsed[0], parsed[1], p))
    return sorted(out, key=lambda r: (r[0], -1 if r[1] is None else r[1]))
