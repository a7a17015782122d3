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

import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

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
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in diff[:3])
        raise EDM2Error(f"outdir={out} holds a different run ({shown}); use another outdir, or force_new=True to "
                         f"start over there (its files move to {out}/previous-N/)")
    return "resume"


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


def _short(v, n=60):
    s = json.dumps(v)
    return s if len(s) <= n else s[:n] + "..."


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
