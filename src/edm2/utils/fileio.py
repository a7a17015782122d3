"""Writing files safely: the one place where edm2 puts bytes on disk.

- `atomic_write_bytes(path, data)` and `AtomicWriter` (a context manager for
  outputs too large to hold in memory): the data goes to a temporary file
  `.<name>.<random>.tmp` in the target folder, is fsynced and then renamed
  over `path`. Readers therefore see the old file or the complete new one,
  never a half-written one. On any failure (disk full, read-only folder, an
  interrupt, even a failing close) the temporary file is removed and one
  `WriteError` naming the file and the fix is raised.
- `atomic_folder(outdir, write)`: a whole folder written under a temporary
  name and renamed into place when complete; `move_into_place(tmp, dest)`:
  that final rename, replacing an existing file or folder without ever
  losing it; `check_replaceable(dest, inputs)`: the one guard every command
  that replaces a folder calls first, refusing a destination that is or holds
  one of its inputs or an edm2 training run.
- `png_bytes(image)`: PNG encoding to bytes; `save_figure(fig, path)`: a
  matplotlib figure as PNG, written atomically.
- `RunLock(folder)`: the operating system's exclusive lock on a run/output
  folder, so two processes never write into the same folder at once.
- `remove_temp_files(folder, prefixes)`: delete temporary files a killed
  process left behind (only call it while holding the folder's `RunLock`).
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import EDM2Error, ExistingFileError

LOCK_NAME = ".edm2.lock"          # the OS lock (RunLock)
HOLDER_NAME = ".edm2.lock.json"   # who holds it: pid, host, command
LOCK_FILES = (LOCK_NAME, HOLDER_NAME)


class WriteError(OSError):
    """A file could not be written (disk full, read-only, permission denied, ...).
    Its message is one line naming the file and what to do; nothing partial is left."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


def describe_os_error(e: OSError, path=None) -> str:
    """One line for an OSError: the file, what went wrong and the usual fix."""
    path = path if path is not None else (e.filename or "?")
    code = e.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"{path}: no space left on the device; free some space or choose a folder on another disk"
    if code == errno.EROFS:
        return f"{path}: the file system is read-only; choose a folder you can write to"
    if code in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied; choose a folder you can write to (or fix its permissions)"
    if code == errno.ENOENT:
        return f"{path}: no such file or folder"
    if code == errno.EEXIST:
        return (f"{path}: cannot create it: a file of that name (or of a folder on its path) is in the way; "
                f"choose another path")
    if code == errno.ENOTDIR:
        return f"{path}: a part of this path is a file, not a folder; choose another path"
    if code == errno.EISDIR:
        return f"{path}: is a folder; give a file name"
    if isinstance(e, WriteError):
        return str(e)
    reason = e.strerror or str(e) or type(e).__name__
    return f"{path}: {reason}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _quiet(fn, *args) -> None:
    """Call fn for cleanup; a second failure must not hide the first or leave files."""
    try:
        fn(*args)
    except OSError:
        pass


class AtomicWriter:
    """A file-like object writing `path` atomically (temp file in the same folder,
    fsync, rename). Use as a context manager:

        with AtomicWriter(path) as f:
            f.write(header)
            f.write(block)           # as many times as needed

    Leaving the block normally commits (renames into place); an exception
    (including KeyboardInterrupt) aborts: the temp file is removed whatever
    happens during the cleanup. `commit()` / `abort()` can also be called
    directly. Failures to write raise `WriteError` (an OSError) with a
    one-line message. It supports write/tell/seek/flush, enough for zipfile."""

    def __init__(self, path):
        self.path = Path(path)
        self.tmp = None
        self._fd = None
        self._pos = 0
        self._error = None
        self.closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as e:
            raise WriteError(describe_os_error(e, self.path), e.errno) from None
        self._fd, self.tmp = fd, Path(tmp)

    # -- file-like interface -------------------------------------------------
    def _check_open(self) -> None:
        """After a failure every further call repeats the first error (callers such
        as zipfile keep writing in their own cleanup); after commit/abort: closed."""
        if self._error is not None:
            raise WriteError(str(self._error), self._error.code)
        if self._fd is None:
            raise WriteError(f"{self.path}: already closed")

    def write(self, data) -> int:
        self._check_open()
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            self._fail(e)
        self._pos += total
        return total

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        try:
            self._pos = os.lseek(self._fd, offset, whence)
        except OSError as e:
            self._fail(e)
        return self._pos

    def flush(self) -> None:
        pass  # unbuffered: every write() went to the kernel

    def fileno(self) -> int:
        return self._fd

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    # -- completion ----------------------------------------------------------
    def finish(self) -> Path:
        """fsync and close the temporary file, and give it the usual permissions
        (mkstemp makes it private) -> its path; the caller moves it into place
        (or calls abort()). `commit()` does this and the rename."""
        self._check_open()
        try:
            if self._fd is not None:
                os.fsync(self._fd)
                fd, self._fd = self._fd, None
                os.close(fd)
            os.chmod(self.tmp, 0o666 & ~_umask())
        except OSError as e:
            self._fail(e)
        return self.tmp

    def commit(self) -> Path:
        """fsync, close and rename into place -> path."""
        self.finish()
        try:
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._fail(e)
        self.closed = True
        return self.path

    def abort(self) -> None:
        """Remove the temporary file (never raises)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _quiet(os.close, fd)
        if self.tmp is not None:
            _quiet(os.unlink, self.tmp)
        self.closed = True

    def _fail(self, e: OSError):
        self._error = WriteError(describe_os_error(e, self.path), e.errno)
        self.abort()
        raise self._error from None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
            return False
        self.abort()
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(describe_os_error(exc, self.path), exc.errno) from None
        return False


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file + fsync + rename); on failure
    nothing is left behind and `WriteError` says why in one line."""
    with AtomicWriter(path) as f:
        f.write(data)
    return Path(path)


def move_into_place(tmp, dest) -> Path:
    """Rename the finished temporary file or folder `tmp` (made beside `dest` by
    mkstemp/mkdtemp) to `dest`, replacing what is there. It first gets the
    usual permissions (mkstemp/mkdtemp make private entries). A folder cannot be
    renamed over another: the old one is moved aside, the new one renamed into
    place, and only then the old one deleted, so `dest` is never lost: at every
    moment it is the old or the complete new one (the old one under a temporary
    name for the instant between the two renames)."""
    tmp, dest = Path(tmp), Path(dest)
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_umask())
    if dest.exists() and (dest.is_dir() or tmp.is_dir()):
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, trash / "old")
        try:
            os.replace(tmp, dest)
        except BaseException:
            _quiet(os.replace, trash / "old", dest)  # put the old one back
            _quiet(os.rmdir, trash)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


# The files by which a folder is recognised as an edm2 training run (or a folder of a run's
# snapshots): the trainer's checkpoints (`edm2.train.checkpoint.checkpoint_name`), its EMA
# snapshots (`edm2.io.snapshot.snapshot_name`), and its log beside its config.json.
_RUN_FILE_RE = re.compile(r"checkpoint-\d{12}\.pt|snapshot-\d{12}-(?:raw|ema|\d+\.\d+)\.safetensors")
_RUN_LOG = ("config.json", "stats.jsonl")


def find_run(folder) -> Path | None:
    """The first folder at or under `folder` that holds an edm2 training run's
    files (checkpoints, EMA snapshots, or config.json with the stats.jsonl log),
    or None."""
    for root, _dirs, files in os.walk(folder):
        if any(_RUN_FILE_RE.fullmatch(f) for f in files) or all(f in files for f in _RUN_LOG):
            return Path(root)
    return None


def check_replaceable(dest, inputs=None, name: str = "outdir") -> Path:
    """Refuse (`EDM2Error`) to replace the existing `dest` when that would delete
    what cannot be made again: one of the command's inputs (`inputs`: {argument
    name: path}; paths that do not exist, such as hub names, are skipped) when
    `dest` is it or holds it, or an edm2 training run at or under `dest`
    (`find_run`). Call it before any work, whether or not overwriting was asked
    for: the refusal names the real reason. `name` is the caller's argument
    for `dest`. Returns `dest` as a Path."""
    dest = Path(dest)
    if not dest.exists():
        return dest
    real = Path(os.path.realpath(dest))
    for arg, given in (inputs or {}).items():
        if not isinstance(given, (str, os.PathLike)) or not os.path.exists(given):
            continue
        path = Path(os.path.realpath(given))
        if path == real or real in path.parents:
            how = "is" if path == real else "holds"
            raise EDM2Error(f"{name}={dest}: {how} the input {arg}={given}; replacing it would delete that input; "
                            f"choose another `{name}`")
    run = find_run(dest) if dest.is_dir() else None
    if run is not None:
        where = "is an edm2 training run folder" if run == dest else f"holds an edm2 training run ({run})"
        raise EDM2Error(f"{name}={dest}: {where}; replacing it would delete the run's checkpoints and snapshots; "
                        f"choose another `{name}`")
    return dest


def atomic_folder(outdir, write, overwrite: bool = False, name: str = "outdir", inputs=None) -> Path:
    """Create the folder `outdir` with `write(tmp_folder)`: everything goes to a
    temporary folder `.<name>.<random>.tmp` beside it, renamed into place at the
    end (`move_into_place`), so a failure leaves nothing behind and an existing
    outdir is replaced (only with overwrite; a non-empty one is refused
    otherwise) once the new one is complete. An outdir that is or holds one of
    `inputs` ({argument name: path}) or an edm2 run is never replaced
    (`check_replaceable`). `name` is the caller's argument for `outdir`, named
    in its messages."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ExistingFileError(f"{name}={outdir}: exists and is not a folder")
    if outdir.is_dir() and any(outdir.iterdir()):
        check_replaceable(outdir, inputs, name)
        if not overwrite:
            raise ExistingFileError(f"{name}={outdir}: exists and is not empty; pass overwrite=True or choose "
                                    "another folder")
    try:
        outdir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", suffix=".tmp", dir=outdir.parent))
    except OSError as e:
        raise WriteError(describe_os_error(e, outdir)) from None
    try:
        write(tmp)
        move_into_place(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return outdir


def png_bytes(image, compress_level: int = 6) -> bytes:
    """Encode a PIL image or a uint8 array ([H, W] or [H, W, C], C in 1, 3, 4) as PNG."""
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise EDM2Error(f"png_bytes: expected uint8 pixels, got {arr.dtype}")
        image = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (figures are only
    ever written to files). Imported on first use: pyplot takes seconds to
    import, and most commands draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path=None, dpi: int = 100) -> bytes:
    """Render a matplotlib figure to PNG bytes, close it, and write it
    atomically to `path` when given."""
    plt = pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    if path is not None:
        atomic_write_bytes(path, buf.getvalue())
    return buf.getvalue()


def temp_name_matches(name: str, prefixes=None) -> bool:
    """Whether `name` is one of AtomicWriter's temporary files (`.<target>.<random>.tmp`),
    optionally only for targets starting with one of `prefixes`."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    return prefixes is None or any(name[1:].startswith(p) for p in prefixes)


def remove_temp_files(folder, prefixes=None) -> list[Path]:
    """Delete the temporary files (`.<target>.<random>.tmp`) that a killed process
    left in `folder`, optionally only those of targets starting with `prefixes`.
    Call it only while holding the folder's RunLock (another process's temp
    files are in use)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if temp_name_matches(p.name, prefixes) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return sorted(removed)


# ---------------------------------------------------------------------------
# One writer per folder.
# ---------------------------------------------------------------------------

class LockError(EDM2Error, RuntimeError):
    """The folder is in use by another process."""


def _command_line() -> str:
    """This process's command as a user typed it: `edm2 train ...`, `python -m edm2 train ...`."""
    argv = list(sys.argv) or ["?"]
    prog = Path(argv[0])
    if prog.name == "__main__.py":
        argv[0] = f"python -m {prog.parent.name}"
    elif argv[0] not in ("-c", "-m", ""):
        argv[0] = prog.name
    return " ".join(argv)


class RunLock:
    """Exclusive lock on an output folder, so that one process at a time writes
    into it:

        with RunLock(outdir):
            ...  # only this process writes into outdir

    The lock is the operating system's lock (`filelock`, flock on POSIX) on the
    file `<folder>/.edm2.lock`: the OS releases it when the holder ends, however
    it ends (killed, out of memory, machine rebooted), so a lock never goes
    stale. Beside it, `<folder>/.edm2.lock.json` names the holder (pid, host,
    command, start time) for the message that refuses a second process. Both
    files are removed on release. The folder is created if needed, and removed
    again on release if it was created here and is still empty (a refused
    command leaves nothing behind). `what` is the caller's name for the folder
    in messages (e.g. "`outdir`")."""

    def __init__(self, folder, what: str = "output folder", warn=None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.holder_path = self.folder / HOLDER_NAME
        self.what = what
        self.warn = warn if warn is not None else (lambda msg: print(msg, file=sys.stderr))
        self._lock = None
        self._created_folder = False

    @staticmethod
    def _describe() -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": _command_line()[:500]}

    def holder(self) -> dict | None:
        """The holder's description (pid, host, command, started), or None if unknown."""
        try:
            info = json.loads(self.holder_path.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def acquire(self) -> RunLock:
        import filelock  # takes a quarter of a second to import; only commands that write a folder need it

        if self._lock is not None:
            raise LockError(f"{self.path}: already held by this object")
        if self.folder.exists() and not self.folder.is_dir():
            raise LockError(f"{self.folder}: exists and is not a folder; choose another {self.what}")
        try:
            if not self.folder.exists():
                self.folder.mkdir(parents=True)
                self._created_folder = True
        except FileExistsError:
            pass
        except OSError as e:
            raise WriteError(describe_os_error(e, self.folder), e.errno) from None
        for _ in range(20):
            lock = filelock.FileLock(str(self.path), timeout=0)
            try:
                lock.acquire()
            except filelock.Timeout:
                self._cleanup_folder()
                raise LockError(self._refusal()) from None
            except OSError as e:
                self._cleanup_folder()
                raise WriteError(describe_os_error(e, self.path), e.errno) from None
            if not self._same_file(lock):
                lock.release()  # the holder removed the file as we locked it: lock the new one
                continue
            self._lock = lock
            break
        else:
            self._cleanup_folder()
            raise LockError(f"{self.path}: could not take the lock (it keeps changing); is another edm2 "
                            f"command starting in {self.folder}?")
        previous = self.holder()
        if previous is not None:
            self.warn(f"note: {self.folder}: process {previous.get('pid')} on {previous.get('host')} "
                      f"({previous.get('command', '?')}) ended without releasing it (it is no longer running)")
        try:
            atomic_write_bytes(self.holder_path, json.dumps(self._describe()).encode())
        except BaseException:
            self.release()
            raise
        return self

    def _same_file(self, lock) -> bool:
        """Whether the locked file is still the one at self.path (a releasing holder
        unlinks it; whoever locked the unlinked file must lock the new one)."""
        fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        if fd is None:
            return True
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)

    def _refusal(self) -> str:
        info = self.holder()
        fix = f"wait for it to finish or stop it, or choose another {self.what}"
        if info is None:
            return f"{self.folder} is in use by another process (lock {self.path}); {fix}"
        pid, host = info.get("pid"), info.get("host")
        who = ("this process" if pid == os.getpid() and host == socket.gethostname()
               else f"process {pid} on {host}")
        return (f"{self.folder} is in use by {who} ({info.get('command', '?')}, since {info.get('started', '?')}), "
                f"lock {self.path}; {fix}")

    def _cleanup_folder(self) -> None:
        if self._created_folder:
            _quiet(os.rmdir, self.folder)  # only succeeds while empty
            self._created_folder = False

    def release(self) -> None:
        if self._lock is None:
            return
        # Remove the files while still holding the lock (see _same_file), then let go.
        _quiet(os.unlink, self.holder_path)
        _quiet(os.unlink, self.path)
        lock, self._lock = self._lock, None
        lock.release()
        self._cleanup_folder()

    @property
    def held(self) -> bool:
        return self._lock is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, exc_type, exc, tb):
        self.release()
        return False
