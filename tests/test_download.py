"""The cache folder and the one download route (edm2.io.download)."""
from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import pytest

from edm2.data import builtin_dataset_path, default_cache_dir
from edm2.io import download as dl
from edm2.metrics import detector_dir
from edm2.utils.errors import EDM2Error


@pytest.fixture()
def served(tmp_path):
    """A file reachable by a file:// URL (urllib reads it like an HTTP download, with a Content-Length)."""
    src = tmp_path / "cdn" / "edm2" / "posthoc-reconstructions" / "edm2-img64-s-1073741-0.045.pkl"
    src.parent.mkdir(parents=True)
    src.write_bytes(bytes(range(256)) * 5000)  # 1.28 MB: more than one 1 MiB read
    return src, f"file://{src}"


def test_layout_with_and_without_edm2_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EDM2_CACHE", raising=False)
    monkeypatch.delenv("EDM2_DETECTOR_DIR", raising=False)
    home = tmp_path / "home" / ".cache" / "edm2"
    url = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-s-2147483-0.130.pkl"
    # The paths of earlier versions, so that existing caches are found.
    assert dl.cache_root() == home
    assert dl.cached_path(url) == home / "downloads" / "nvlabs-fi-cdn.nvidia.com" / "edm2" / "posthoc-reconstructions" \
        / "edm2-img512-s-2147483-0.130.pkl"
    assert detector_dir() == home / "detectors"
    assert default_cache_dir() == home
    # $EDM2_CACHE moves the root; the folders under it stay the same.
    monkeypatch.setenv("EDM2_CACHE", str(tmp_path / "c"))
    root = tmp_path / "c"
    assert dl.cache_root() == root
    assert dl.cached_path(url).relative_to(root).parts[:2] == ("downloads", "nvlabs-fi-cdn.nvidia.com")
    assert detector_dir() == root / "detectors"
    assert default_cache_dir() == root
    assert builtin_dataset_path().parent == root
    # An explicit folder still wins.
    monkeypatch.setenv("EDM2_DETECTOR_DIR", str(tmp_path / "det"))
    assert detector_dir() == tmp_path / "det" and detector_dir(tmp_path / "x") == tmp_path / "x"


def test_fetch_downloads_once_into_edm2_cache(served, tmp_path, monkeypatch):
    src, url = served
    monkeypatch.setenv("EDM2_CACHE", str(tmp_path / "cache"))
    got = dl.fetch(url, progress=False)
    assert got == tmp_path / "cache" / "downloads" / "local" / Path(*src.parts[1:])
    assert got.read_bytes() == src.read_bytes()
    assert [p.name for p in got.parent.iterdir()] == [src.name]  # no temporary file left
    src.unlink()  # the cached copy is used from now on
    assert dl.fetch(url, progress=False) == got
    # A local path is returned as given; a missing one is a one-line error.
    assert dl.fetch(str(got)) == got
    with pytest.raises(FileNotFoundError, match="no such file"):
        dl.fetch(str(tmp_path / "nothing.pkl"))


class _Truncated(io.BytesIO):
    """A response that announces more bytes than it sends (a dropped connection)."""
    headers = {"Content-Length": "1000"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_failed_download_leaves_nothing_and_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("EDM2_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "cache" / "detectors" / "weights.pth"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Truncated(b"x" * 600))
    with pytest.raises(dl.DownloadError) as e:
        dl.download_file("https://example.org/weights.pth", dest, progress=False)
    msg = str(e.value)
    assert "https://example.org/weights.pth" in msg and "600 of 1000 bytes" in msg and str(dest) in msg
    assert "EDM2_CACHE" in msg and len(msg.splitlines()) == 1
    assert list(dest.parent.iterdir()) == []  # neither the file nor a temporary one
    # The same response complete: the file is written whole.
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Truncated(b"y" * 1000))
    assert dl.download_file("https://example.org/weights.pth", dest, progress=False).read_bytes() == b"y" * 1000
    # A URL naming no file.
    with pytest.raises(EDM2Error, match="url=https://example.org: names no file"):
        dl.cached_path("https://example.org")
