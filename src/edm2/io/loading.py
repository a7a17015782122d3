"""Load a network from anything a user may name: an edm2 snapshot file, a
training run folder, or one of the authors' published `.pkl` files (a path or
a URL, downloaded once to the cache).

Generation, metrics, post-hoc EMA sweeps and `train --init` all open their
networks here. The snapshot file format itself lives in `edm2.io.snapshot`, the
safe import of the authors' pickles in `edm2.io.official`; this module only
decides which of the two a name refers to. Nothing here executes code from a
file.
"""
from __future__ import annotations

from pathlib import Path

from .official import is_url, load_official
from .snapshot import SnapshotError, list_snapshots, load_snapshot

__all__ = ["resolve_snapshot_path", "load_network"]


def resolve_snapshot_path(source) -> Path:
    """A snapshot file as given, or for a run folder its preferred snapshot:
    the latest nimg, and among those the longest stored EMA (largest sigma_rel)."""
    path = Path(source)
    if path.is_dir():
        found = [r for r in list_snapshots(path) if r[1] is not None] or list_snapshots(path)
        if not found:
            raise SnapshotError(f"{path}: folder holds no snapshot-*.safetensors files; "
                                f"pass a snapshot file or a run folder")
        last = max(r[0] for r in found)
        return [r for r in found if r[0] == last][-1][2]
    if not path.exists():
        raise SnapshotError(f"{path}: no such snapshot file or run folder")
    return path


def load_network(source, device="cpu"):
    """Load a network from anything a user may name -> (Precond in eval mode, meta):
    an edm2 snapshot file, a run folder (see `resolve_snapshot_path`), or one of the
    authors' published .pkl files / URLs (read by `edm2.io.official.load_official`'s
    restricted unpickler, which never executes code from the file)."""
    if is_url(source) or str(source).endswith(".pkl"):
        return load_official(source, device=device)
    return load_snapshot(resolve_snapshot_path(source), device=device)
