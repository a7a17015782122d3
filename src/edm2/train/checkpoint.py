"""Resume checkpoints of a training run (`checkpoint-NNNNNNNNNNNN.pt` in the
run folder).

A checkpoint holds everything needed to continue bit for bit: `nimg` (the
image count), `seed`, `net` and `optimizer` state and `ema` (every EMA
profile); `edm2.train.loop` declares these entries once, for saving and
restoring, and refuses a checkpoint whose seed is not the run's. The data
order and all random numbers of the trainer are functions of (seed, image
position), so the image count is also the data-order position and the RNG
state (checkpoints of earlier versions also hold it as `data_position`, which
is not read). Files are written with `torch.save` to memory, then atomically
(temp file, fsync, rename); they are read with `torch.load(weights_only=True)`
(no pickle code runs). A truncated or corrupt checkpoint is reported and the
previous one is used.

`check_run_folder` decides whether an output folder is a new run, the same run
(resume) or a different one (refused unless started over with `archive_run`).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.dataset import list_dataset_files
from ..io.snapshot import list_snapshots
from ..nn import precision_kwargs
from ..utils.errors import EDM2Error
from ..utils.fileio import LOCK_FILES, atomic_write_bytes, remove_temp_files
from ..utils.validate import safe_error_text

CHECKPOINT_FORMAT = "edm2-checkpoint"
_NOT_RUN_FILES = set(LOCK_FILES)  # files in a run folder that belong to no run (kept by archive_run)
_NAME_RE = re.compile(r"checkpoint-(\d{12})\.pt$")


def checkpoint_name(nimg: int) -> str:
    """'checkpoint-000000032768.pt': sortable by image count."""
    return f"checkpoint-{nimg:012d}.pt"


def list_checkpoints(folder) -> list[tuple[int, Path]]:
    """(nimg, path) of the checkpoint files in folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME_RE.fullmatch(p.name)) and p.is_file()]
    return sorted(found)


def save_checkpoint(path, state: dict) -> None:
    """Serialise state (tensors, numbers, strings, dicts, lists) and write it atomically."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load one checkpoint; `EDM2Error` naming the file if it is unreadable."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad magic, unexpected object types, ...
        raise EDM2Error(f"{path}: unreadable checkpoint ({safe_error_text(e)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise EDM2Error(f"{path}: not an edm2 training checkpoint")
    return state


def load_latest_checkpoint(folder, map_location="cpu", warn: Callable[[str], None] = print):
    """The newest readable checkpoint in folder -> (state, path), or (None, None).
    Unreadable ones are reported through `warn` and skipped (never deleted)."""
    for _nimg, path in reversed(list_checkpoints(folder)):
        try:
            return load_checkpoint(path, map_location), path
        except ValueError as e:
            warn(f"warning: {e}; falling back to the previous checkpoint")
    return None, None


def remove_stale_temp_files(folder) -> list[Path]:
    """Delete the temporary files a killed process left behind while writing
    a checkpoint or snapshot (`.checkpoint-*.tmp`, `.snapshot-*.tmp`)."""
    return remove_temp_files(folder, ("checkpoint-", "snapshot-", "grid-", "config.json."))


# Settings that config.json gained with the configs of the paper's ablation (Table 1); older runs are G.
_ADDED_SETTINGS = {"config": "G", "loss": "uncertainty", "adam_beta2": 0.99, "ema": "power", "ema_halflife": 0.0,
                   "ema_rampup_ratio": 0.05}


def check_run_folder(identity: dict, outdir, force_new: bool = False) -> str:
    """What to do with outdir for a run described by `identity` (the settings that
    define a run, stored as config.json): 'fresh', 'resume' (same settings) or
    'archive' (force_new over an existing run). Reads only; `EDM2Error` on a conflict."""
    out = Path(outdir)
    if not out.exists():
        return "fresh"
    if not out.is_dir():
        raise EDM2Error(f"outdir={out}: exists and is not a folder; choose another outdir")
    cfg = out / "config.json"
    if not cfg.is_file():
        if any(p.name not in _NOT_RUN_FILES for p in out.iterdir()):
            raise EDM2Error(f"outdir={out}: not empty and has no config.json, so it is not an edm2 run; "
                             f"choose a new or empty folder")
        return "fresh"
    if force_new:
        return "archive"
    try:
        old = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise EDM2Error(f"{cfg}: unreadable ({e}); use another outdir, or force_new=True to start over") from None
    if isinstance(old.get("net_kwargs"), dict):  # runs of edm2 0.1 stored use_fp16/reduced_dtype
        old["net_kwargs"] = precision_kwargs(old["net_kwargs"])
    new = json.loads(json.dumps(identity))
    for key, value in _ADDED_SETTINGS.items():  # runs from before the ablation configs: config G
        if key in new:
            old.setdefault(key, value)
    for key in ADDED_KEYS:  # a run started before edm2 stored it resumes without it
        if key not in old:
            new.pop(key, None)
    diff = _leaf_diff(old, new)
    if "data_fingerprint" in diff and all(k == "data_fingerprint" or k.startswith("dataset.") for k in diff):
        raise EDM2Error(f"data={new.get('data')}: the dataset's content changed since the run in {out} started "
                        f"(fingerprint {old['data_fingerprint']} -> {new['data_fingerprint']}); resume with the "
                        f"original data, or train on this data in another outdir or with force_new=True")
    if diff:
        shown = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in diff.items())
        raise EDM2Error(f"outdir={out} holds a different run ({shown}); use another outdir, or force_new=True to "
                         f"start over there (its files move to {out}/previous-N/)")
    return "resume"


def read_run_config(outdir) -> dict | None:
    """The config.json of the run in outdir, or None when there is none (or it
    cannot be read: `check_run_folder` reports that)."""
    try:
        stored = json.loads((Path(outdir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def check_restart(folder) -> None:
    """Refuse (`EDM2Error`) to start a run again from image 0 in a folder whose
    checkpoints are all unreadable or missing while it holds files of that run
    beyond its start (snapshots after image 0, sample grids, checkpoints):
    starting over would overwrite them."""
    folder = Path(folder)
    checkpoints = [p for _, p in list_checkpoints(folder)]
    kept = checkpoints + [p for n, _, p in list_snapshots(folder) if n > 0] + sorted(folder.glob("grid-*.png"))
    if kept:
        why = f"its {len(checkpoints)} checkpoint(s) are unreadable" if checkpoints else "it has no checkpoint"
        raise EDM2Error(f"outdir={folder}: holds a run ({len(kept)} snapshot/grid/checkpoint files) but {why}; "
                         f"starting again from image 0 would overwrite them; use force_new=True to start over "
                         f"(the old files move to {folder}/previous-N/)")


_ABSENT = object()   # a key one of the two config.json files lacks


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def _leaf_diff(old, new, prefix: str = "") -> dict:
    """{dotted key: (old value, new value)} of every differing leaf of two
    config.json dicts (nested dicts are walked; `_ABSENT` for a missing key)."""
    diff = {}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, _ABSENT), new.get(k, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            diff.update(_leaf_diff(a, b, f"{prefix}{k}."))
        elif a != b:
            diff[f"{prefix}{k}"] = (a, b)
    return diff


# config.json keys that newer versions store: a run whose config.json lacks one resumes without it.
ADDED_KEYS = ("data_fingerprint",)

_FINGERPRINT_ITEMS = 32   # dataset files (in sorted order) whose bytes a folder's fingerprint hashes


def dataset_fingerprint(path) -> str:
    """A short fingerprint of a dataset's content, stored in config.json so
    that a resume on changed data (same path, other images) is refused.

    Cheap on big datasets (no item is decoded): for a zip, its central
    directory: every member's name, CRC-32 and size (so any change of any
    member's bytes shows). For a folder: every file's relative name and size,
    and the bytes of dataset.json and of the first 32 files in sorted order
    (an edit that keeps a later file's size is not seen). Modification times
    are left out, so a copied or re-downloaded dataset keeps its fingerprint."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        with zipfile.ZipFile(path) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                h.update(f"{info.filename}\0{info.CRC:08x}\0{info.file_size}\n".encode())
        return "zip:" + h.hexdigest()[:16]
    names = list_dataset_files(path)
    for name in names:
        h.update(f"{name}\0{(path / name).stat().st_size}\n".encode())
    for name in [n for n in names if n == "dataset.json"] + [n for n in names if n != "dataset.json"][
            :_FINGERPRINT_ITEMS]:
        h.update((path / name).read_bytes())
    return "dir:" + h.hexdigest()[:16]


def archive_run(out) -> Path:
    """Move the run in `out` into out/previous-N/ (nothing is deleted)."""
    out = Path(out)
    n = 1
    while (out / f"previous-{n}").exists():
        n += 1
    dest = out / f"previous-{n}"
    dest.mkdir()
    for p in list(out.iterdir()):
        if p != dest and not p.name.startswith("previous-") and p.name not in _NOT_RUN_FILES:
            shutil.move(str(p), dest / p.name)
    return dest
