"""The cache folder and the one download route of edm2.

Everything edm2 keeps between runs lives under one root, `cache_root()`:
`$EDM2_CACHE` if set, else `~/.cache/edm2`. Under it, one folder per purpose
(the same layout with or without `$EDM2_CACHE`):

    <root>/downloads/<host>/<path>   published files fetched by URL (docs/published-models.md)
    <root>/downloads/converted/...   folders of the authors' raw snapshots converted for post-hoc EMA
    <root>/detectors/                metric detector weights (docs/metrics.md; $EDM2_DETECTOR_DIR overrides)
    <root>/<zip>                     the built-in Fashion-MNIST dataset, converted on first use (docs/datasets.md)

`download_file(url, dest)` is the one function that fetches a file: to a temporary
file in the destination folder, renamed into place only when complete (the
cache never holds a partial file), with a tqdm progress bar, and a one-line
`DownloadError` naming the URL and where to put the file by hand when it fails.
`fetch(source)` returns a local path as given, or the cached copy of a URL.
"""
from __future__ import annotations

import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..utils.errors import EDM2Error, MissingFileError
from ..utils.fileio import AtomicWriter

__all__ = ["DownloadError", "cache_root", "cache_dir", "cached_path", "download_file", "fetch"]

CACHE_ENV = "EDM2_CACHE"


class DownloadError(EDM2Error, RuntimeError):
    """A file could not be fetched (offline, unreachable, HTTP error, truncated transfer)."""


def cache_root() -> Path:
    """The root of edm2's cache: `$EDM2_CACHE`, else `~/.cache/edm2`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edm2"


def cache_dir(purpose: str) -> Path:
    """The cache folder for one purpose: `cache_root() / purpose`
    ("downloads", "detectors"; see the module docstring)."""
    return cache_root() / purpose


def is_url(source) -> bool:
    """Does `source` name a URL (rather than a local path)?"""
    return isinstance(source, str) and "://" in source


def cached_path(url: str) -> Path:
    """Where `url` is (or will be) cached: `<cache_root>/downloads/<host>/<path of the URL>`, e.g.
    ~/.cache/edm2/downloads/nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-s-2147483-0.130.pkl.
    (Raw snapshots of different models share file names, hence the full path.)"""
    parts = urllib.parse.urlsplit(url)
    segments = [s for s in [parts.netloc or "local"] + parts.path.split("/") if s not in ("", ".", "..")]
    if len(segments) < 2:
        raise EDM2Error(f"url={url}: names no file")
    return cache_dir("downloads").joinpath(*[re.sub(r"[^A-Za-z0-9._-]", "_", s) for s in segments])


def download_file(url: str, dest, progress: bool = True, timeout: float = 60) -> Path:
    """Download `url` to the file `dest` (its folder is created): written to a
    temporary file next to it and renamed into place when complete, so `dest` is
    either the whole file or absent. Raises DownloadError naming the URL and
    where to put the file by hand (offline machines). Returns `dest`."""
    dest = Path(dest)
    try:
        with AtomicWriter(dest) as out:  # the temp file is removed if anything fails
            with urllib.request.urlopen(url, timeout=timeout) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                done = 0  # counted here: a disabled tqdm bar counts nothing
                with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest),
                          disable=not progress) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        done += len(chunk)
                        bar.update(len(chunk))
                if total is not None and done != total:
                    raise OSError(f"connection closed after {done} of {total} bytes")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"cannot download {url} ({reason}); if this machine is offline, fetch the file "
                            f"elsewhere and place it at {dest} (cache folder {cache_root()}, set by "
                            f"${CACHE_ENV})") from None
    return dest


def fetch(source, progress: bool = True) -> Path:
    """A local path as given (it must exist), or the cached copy of a URL,
    downloaded once into `cached_path(url)`."""
    if not is_url(source):
        path = Path(source)
        if not path.is_file():
            raise MissingFileError(f"{path}: no such file")
        return path
    dest = cached_path(source)
    return dest if dest.is_file() else download_file(source, dest, progress)
