"""edm2.utils.fileio: atomic writes that never leave temp files, PNG bytes, RunLock."""
import errno
import json
import os
import socket
import zipfile

import numpy as np
import pytest
from PIL import Image

from edm2.utils import fileio
from edm2.utils.errors import ExistingFileError
from edm2.utils.fileio import (
    AtomicWriter,
    LockError,
    RunLock,
    WriteError,
    atomic_folder,
    atomic_write_bytes,
    move_into_place,
    png_bytes,
    remove_temp_files,
)
from helpers.cli import hold_lock


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second version")
    assert path.read_bytes() == b"second version"
    assert _listing(path.parent) == ["a.bin"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~fileio._umask())


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_enospc_during_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old contents")
    monkeypatch.setattr(os, "write", _enospc)
    with pytest.raises(WriteError) as info:
        atomic_write_bytes(path, b"x" * 1000)
    monkeypatch.undo()
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "no space left" in msg
    assert info.value.code == errno.ENOSPC
    assert _listing(tmp_path) == ["out.bin"] and path.read_bytes() == b"old contents"


def test_enospc_in_fsync_and_failing_close_leave_nothing(tmp_path, monkeypatch):
    """The disk fills at the fsync, and the cleanup's own close fails as well:
    still one WriteError about the disk, and no temp file."""
    path = tmp_path / "out.bin"
    real_close = os.close
    opened = []

    def failing_close(fd):
        opened.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", _enospc)
    monkeypatch.setattr(os, "close", failing_close)
    with pytest.raises(WriteError, match="no space left on the device"):
        with AtomicWriter(path) as f:
            f.write(b"abc" * 100)
    monkeypatch.undo()
    for fd in opened:
        real_close(fd)
    assert _listing(tmp_path) == []


def test_failing_close_at_commit(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    real_close = os.close
    opened = []

    def failing_close(fd):
        opened.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    w = AtomicWriter(path)
    w.write(b"data")
    monkeypatch.setattr(os, "close", failing_close)
    with pytest.raises(WriteError, match="Input/output error"):
        w.commit()
    monkeypatch.undo()
    for fd in opened:
        real_close(fd)
    assert _listing(tmp_path) == []


def test_exception_inside_block_aborts(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(KeyError):
        with AtomicWriter(path) as f:
            f.write(b"partial")
            raise KeyError("boom")
    assert _listing(tmp_path) == []


def test_zipfile_on_atomic_writer_and_failing_zip_close(tmp_path, monkeypatch):
    """A zip written through AtomicWriter is valid; when its close (central
    directory) fails on a full disk, aborting still removes the temp file."""
    good = tmp_path / "good.zip"
    with AtomicWriter(good) as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("a.txt", b"hello")
            zf.writestr("b/c.txt", b"x" * 5000)
    with zipfile.ZipFile(good) as zf:
        assert zf.read("b/c.txt") == b"x" * 5000 and zf.namelist() == ["a.txt", "b/c.txt"]

    w = AtomicWriter(tmp_path / "bad.zip")
    zf = zipfile.ZipFile(w, "w")
    zf.writestr("a.txt", b"hello" * 1000)
    monkeypatch.setattr(os, "write", _enospc)
    with pytest.raises(WriteError):
        zf.close()
    monkeypatch.undo()
    w.abort()  # already done by the failed write; a second call must be harmless
    assert _listing(tmp_path) == ["good.zip"]


def test_read_only_parent_is_one_line(tmp_path, monkeypatch):
    def no_mkstemp(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", no_mkstemp)
    with pytest.raises(WriteError, match="read-only; choose a folder you can write to"):
        atomic_write_bytes(tmp_path / "x.bin", b"1")


def test_png_bytes_round_trip():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5, 1)
    import io
    for arr in (rgb, grey, grey[:, :, 0]):
        back = np.asarray(Image.open(io.BytesIO(png_bytes(arr))))
        np.testing.assert_array_equal(back, arr.reshape(back.shape))
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(rgb.astype(np.float32))


def test_remove_temp_files(tmp_path):
    for name in (".snapshot-1.safetensors.abc.tmp", ".grid.png.x.tmp", "snapshot-1.safetensors", "notes.tmp"):
        (tmp_path / name).write_bytes(b"")
    removed = remove_temp_files(tmp_path, ("snapshot-",))
    assert [p.name for p in removed] == [".snapshot-1.safetensors.abc.tmp"]
    assert remove_temp_files(tmp_path)[0].name == ".grid.png.x.tmp"
    assert _listing(tmp_path) == ["notes.tmp", "snapshot-1.safetensors"]


# ---------------------------------------------------------------------------
# RunLock
# ---------------------------------------------------------------------------

def test_runlock_excludes_and_releases(tmp_path):
    out = tmp_path / "run"
    with RunLock(out) as lock:
        info = json.loads(lock.holder_path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and "command" in info
        with pytest.raises(LockError) as e:
            RunLock(out).acquire()
        assert str(lock.path) in str(e.value) and "in use by this process" in str(e.value)
        (out / "result.txt").write_text("kept")
    assert _listing(out) == ["result.txt"]
    with RunLock(out):   # released: free again
        pass


def test_runlock_removes_folder_it_created_when_empty(tmp_path):
    with RunLock(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with RunLock(tmp_path / "old"):
        pass
    assert (tmp_path / "old").is_dir()


def test_runlock_refuses_a_live_holder_and_is_free_once_it_dies(tmp_path):
    """The OS lock: refused while another process holds it (the message names that
    process and its command); free as soon as it is killed, without any cleanup."""
    with hold_lock(tmp_path) as proc:
        with pytest.raises(LockError) as e:
            RunLock(tmp_path, "`outdir`").acquire()
        msg = str(e.value)
        assert f"is in use by process {proc.pid} on {socket.gethostname()}" in msg and "\n" not in msg
        assert fileio.LOCK_NAME in msg and f"(-c {tmp_path}, since" in msg and "choose another `outdir`" in msg
        proc.kill()
        proc.wait()
        notes = []
        with RunLock(tmp_path, warn=notes.append) as lock:
            assert json.loads(lock.holder_path.read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"process {proc.pid}" in notes[0] and "no longer running" in notes[0]
    assert _listing(tmp_path) == []


def test_runlock_ignores_lock_files_nobody_holds(tmp_path):
    """A lock file naming a live process or another host, but not locked by the OS
    (an old lock file, a copied folder), does not block the folder."""
    (tmp_path / fileio.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t0"}))
    (tmp_path / fileio.HOLDER_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t0"}))
    notes = []
    with RunLock(tmp_path, warn=notes.append):
        pass
    assert len(notes) == 1 and "elsewhere" in notes[0]
    assert _listing(tmp_path) == []


def test_runlock_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(LockError, match="not a folder"):
        RunLock(tmp_path / "f").acquire()


@pytest.mark.parametrize("dest", ["out.zip", "outdir"])
def test_dataset_writer_disk_full_leaves_nothing(tmp_path, monkeypatch, dest):
    """A full disk while a dataset is written (zip: also at the zip's own close)
    removes the whole temporary output and says so in one line."""
    from edm2.data.writer import DatasetWriter

    writer = DatasetWriter(tmp_path / dest)
    writer.add("00000/img00000000.png", b"x" * 3000)
    if dest.endswith(".zip"):
        monkeypatch.setattr(os, "write", _enospc)
    else:
        monkeypatch.setattr(type(tmp_path), "write_bytes", _enospc)
    with pytest.raises(WriteError) as e:
        with writer:
            writer.add("00000/img00000001.png", b"y" * 3000)
            writer.commit([], None)
    monkeypatch.undo()
    assert str(tmp_path / dest) in str(e.value) and "no space left" in str(e.value)
    assert _listing(tmp_path) == []


def test_atomic_folder_replaces_only_when_complete(tmp_path):
    """An existing folder is refused without overwrite, kept whole when writing the
    new one fails, and replaced by the complete new one otherwise."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ExistingFileError, match=r"outdir=.*out: exists and is not empty; pass overwrite=True"):
        atomic_folder(out, lambda tmp: (tmp / "new.txt").write_text("new"))

    def fail(tmp):
        (tmp / "half.txt").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_folder(out, fail, overwrite=True)
    assert _listing(tmp_path) == ["out"] and _listing(out) == ["old.txt"]
    atomic_folder(out, lambda tmp: (tmp / "new.txt").write_text("new"), overwrite=True)
    assert _listing(tmp_path) == ["out"] and _listing(out) == ["new.txt"]
    assert (out.stat().st_mode & 0o777) == 0o777 & ~fileio._umask()



def test_a_folder_holding_an_input_or_a_run_is_never_replaced(tmp_path):
    """check_replaceable, and atomic_folder with overwrite=True: a destination that is or holds
    one of the inputs, or holds an edm2 run (checkpoints, EMA snapshots, config.json + stats.jsonl)
    at any depth, is refused and left whole; hub names and objects among the inputs are skipped."""
    from edm2.io.snapshot import snapshot_name
    from edm2.train.checkpoint import checkpoint_name

    def write(tmp):
        (tmp / "new.txt").write_text("new")

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "stats.jsonl").write_text("{}\n")
    snap = tmp_path / "plain" / "net.safetensors"   # a snapshot under a name of the user's own
    snap.parent.mkdir()
    snap.write_bytes(b"weights")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for dest, inputs, match in [
            (run, None, "is an edm2 training run folder"),
            (tmp_path / "runs", None, f"holds an edm2 training run \\({run}\\)"),
            (tmp_path, {"source": snap}, f"holds the input source={snap}"),
            (snap.parent, {"source": snap.parent}, "is the input source="),
            (snap.parent, {"source": snap}, "holds the input source=")]:
        with pytest.raises(ValueError, match=rf"outdir={dest}: {match}.*choose another `outdir`"):
            fileio.check_replaceable(dest, inputs)
        with pytest.raises(ValueError, match=rf"outdir={dest}: {match}"):
            atomic_folder(dest, write, overwrite=True, inputs=inputs)
    for name in (checkpoint_name(4096), snapshot_name(4096, 0.05), snapshot_name(4096, None)):
        folder = tmp_path / "only" / name
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"x")
        with pytest.raises(ValueError, match="is an edm2 training run folder"):
            atomic_folder(folder, write, overwrite=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "only" not in p.parts} == before
    assert not list(tmp_path.rglob(".*.tmp"))
    # What may be replaced: an earlier export, with a hub name and a network object as inputs.
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"old")
    inputs = {"source": "stabilityai/sd-vae-ft-mse", "vae": object(), "gnet": None, "net": snap}
    assert fileio.check_replaceable(out, inputs) == out
    atomic_folder(out, write, overwrite=True, inputs=inputs)
    assert _listing(out) == ["new.txt"]

def test_move_into_place_keeps_the_old_folder_when_the_rename_fails(tmp_path, monkeypatch):
    dest, tmp = tmp_path / "data", tmp_path / ".data.x.tmp"
    dest.mkdir()
    (dest / "a.png").write_bytes(b"old")
    tmp.mkdir()
    (tmp / "b.png").write_bytes(b"new")
    real = os.replace

    def refuse_new(src, dst):
        if str(src) == str(tmp):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", refuse_new)
    with pytest.raises(OSError):
        move_into_place(tmp, dest)
    monkeypatch.undo()
    assert _listing(tmp_path) == [".data.x.tmp", "data"] and _listing(dest) == ["a.png"]
    move_into_place(tmp, dest)
    assert _listing(tmp_path) == ["data"] and _listing(dest) == ["b.png"]
