"""Shared code of the bad-input tests: run the CLI in-process, assert a one-line
refusal, and assert that nothing on disk changed.

    from helpers.cli import assert_refused
    msg = assert_refused(["generate", ...], watch=[tmp_path], match="--S-noise")

`tree_hashes(paths)` maps every file (sha256) and folder (None) under the
given paths, hidden ones included, so a refusal that writes, deletes or
leaves a temp file behind is caught.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edm2.cli import main

__all__ = ["tree_hashes", "run_cli", "assert_refused", "small_tmpfs", "fill_disk", "hold_lock"]


def tree_hashes(paths) -> dict:
    """{path: sha256 of a file | None for a folder} for everything under `paths`."""
    out = {}
    for root in map(Path, paths):
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        if not root.exists():
            continue
        for dirpath, _dirs, files in os.walk(root):
            out[dirpath] = None
            for f in files:
                p = Path(dirpath) / f
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv) -> tuple[int, str, str]:
    """Run `edm2 argv` in this process -> (exit status, stdout, stderr).
    Exceptions other than SystemExit propagate (a traceback is a test failure)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_refused(argv, watch=(), match=None, code=None, forbid=("allow_pickle", "weights_only")) -> str:
    """Assert that `edm2 argv` is refused: non-zero exit (== code if given), stderr
    ending in one line `edm2 COMMAND: error: ...` that contains every string in
    `match`, no advice to load files unsafely, and no change under `watch`
    (files and folders hashed before and after). Returns the error line."""
    before = tree_hashes(watch)
    status, _out, err = run_cli(argv)
    after = tree_hashes(watch)
    assert status != 0, f"exit status 0 for {argv}; stderr: {err}"
    if code is not None:
        assert status == code, f"exit status {status}, expected {code}: {err}"
    # Progress bars and warnings may precede it; the error is one line, and the last.
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line, at the end:\n{err}"
    assert "Traceback" not in err, err
    msg = errors[0]
    assert msg.startswith(f"edm2 {argv[0]}: error: "), msg
    for m in [match] if isinstance(match, str) else (match or []):
        assert m in msg, f"{m!r} not in {msg!r}"
    for word in forbid:
        assert word not in msg, f"message mentions {word!r}: {msg}"
    assert after == before, f"files changed: {sorted(set(after.items()) ^ set(before.items()))[:5]}"
    return msg


@contextlib.contextmanager
def small_tmpfs(path, size="1m", read_only=False):
    """Mount a small tmpfs at `path` (created) for disk-full / read-only tests;
    skips the test where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or 'mount failed'}); "
                    f"the disk-full and read-only cases need one")
    try:
        if read_only:
            yield path, lambda: subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        else:
            yield path, None
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder, leave: int = 0) -> None:
    """Write `folder`/filler.bin until at most `leave` bytes are free on its file system."""
    with open(Path(folder) / "filler.bin", "wb", buffering=0) as f:
        try:
            while True:
                st = os.statvfs(folder)
                free = st.f_bavail * st.f_frsize
                if free <= leave:
                    break
                f.write(b"\0" * min(free - leave, 1 << 16))
        except OSError:
            pass


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from edm2.utils.fileio import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@contextlib.contextmanager
def hold_lock(folder):
    """A separate process holding `folder`'s RunLock for the block -> that process
    (a Popen); it is killed (SIGKILL, no cleanup) at the end of the block."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
