"""Writing a dataset (folder or .zip) under a temporary name, renamed into
place only when complete, so a failure never leaves a partial dataset and an
existing one is never touched unless `overwrite=True`."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from ..utils.errors import EDM2Error, ExistingFileError
from ..utils.fileio import AtomicWriter, WriteError, check_replaceable, describe_os_error, move_into_place


def item_name(idx: int, ext: str = "png", prefix: str = "img") -> str:
    """Layout of the official tool: '00000/img00000000.png', 1000 items per folder."""
    return f"{idx // 1000:05d}/{prefix}{idx:08d}.{ext}"


def check_destination(dest, overwrite: bool = False, source=None) -> Path:
    """Refuse an existing destination unless overwrite, and always one that is or
    holds the source or an edm2 training run (`edm2.utils.fileio.check_replaceable`),
    or that lies inside the source folder (whose every file is read): replacing it
    would delete them."""
    dest = check_replaceable(dest, {"source": source}, "dest")
    if dest.exists() and source is not None and Path(source).is_dir() and \
            Path(os.path.realpath(source)) in Path(os.path.realpath(dest)).parents:
        raise EDM2Error(f"dest={dest}: lies inside source={source}; replacing it would delete part of the source; "
                        f"choose a `dest` outside the source folder")
    if dest.exists() and not overwrite:
        raise ExistingFileError(f"dest={dest}: already exists; choose another name or pass overwrite=True")
    return dest


def write_dataset_json(labels, class_names) -> bytes:
    """dataset.json: {"labels": [[path, class], ...] | null, "class_names": [...] (optional)}."""
    meta = {"labels": labels}
    if class_names is not None:
        meta["class_names"] = list(class_names)
    return json.dumps(meta).encode()


class DatasetWriter:
    """Collect items, then `commit(labels, class_names)` writes dataset.json and renames.

    Use as a context manager: an exception inside the block removes the temporary output.
    A destination ending in `.zip` becomes a zip (stored, PNG/npy need no recompression),
    anything else a folder.
    """

    def __init__(self, dest, overwrite: bool = False, source=None):
        self.dest = check_destination(dest, overwrite, source)
        self.overwrite = overwrite
        self.is_zip = self.dest.suffix.lower() == ".zip"
        self._zip = self._file = None
        self.count = 0
        self._done = False
        if self.is_zip:
            self._file = AtomicWriter(self.dest)  # WriteError (one line) if the folder is not writable
            self.tmp = self._file.tmp
            self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED)
        else:
            try:
                self.dest.parent.mkdir(parents=True, exist_ok=True)
                self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".tmp", dir=self.dest.parent))
            except OSError as e:
                raise WriteError(describe_os_error(e, self.dest), e.errno) from None

    def _failed(self, e: OSError):
        """Remove the partial output and raise one line naming the destination."""
        self.abort()
        if isinstance(e, WriteError):
            raise WriteError(str(e).replace(str(self.tmp), str(self.dest)), e.code) from None
        raise WriteError(describe_os_error(e, self.dest), e.errno) from None

    def add(self, relpath: str, data: bytes) -> None:
        try:
            if self._zip is not None:
                self._zip.writestr(relpath, data)
            else:
                path = self.tmp / relpath
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        except OSError as e:
            self._failed(e)
        self.count += 1

    def add_file(self, relpath: str, src: Path) -> None:
        """Copy an existing file (used to pack a folder)."""
        try:
            if self._zip is not None:
                self._zip.write(src, relpath)
            else:
                path = self.tmp / relpath
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, path)
        except OSError as e:
            if not Path(src).is_file():
                self.abort()
                raise
            self._failed(e)
        self.count += 1

    def commit(self, labels=None, class_names=None) -> Path:
        """Write dataset.json ({"labels": [[path, class], ...] | null, "class_names": [...]}) and rename."""
        data = write_dataset_json(labels, class_names)
        try:
            if self._zip is not None:
                self._zip.writestr("dataset.json", data)
                self._zip.close()  # writes the central directory: can fail on a full disk
                self._zip = None
                self._file.finish()
            else:
                (self.tmp / "dataset.json").write_bytes(data)
            self._replace()
        except OSError as e:
            self._failed(e)
        self._done = True
        return self.dest

    def _replace(self):
        move_into_place(self.tmp, self.dest)

    def abort(self):
        """Remove the temporary output; never raises (a second failure, e.g. the zip's
        own close on a full disk, must not leave a dataset-sized temp file behind)."""
        if self._done:
            return
        self._done = True
        if self._zip is not None:
            zf, self._zip = self._zip, None
            try:
                zf.close()
            except Exception:
                pass
        if self._file is not None:
            self._file.abort()
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp.exists():
            try:
                self.tmp.unlink()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self._done:
            self.abort()
        return False
