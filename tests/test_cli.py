"""The command line's error convention (edm2.cli): edm2's own errors are one
line naming the command's flags, exit status 2; the machine's refusals are one
line, exit status 1; anything else (a bug, a failure inside torch) keeps its
traceback."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from edm2.cli import build_parser, flag_message, main
from edm2.cli import flops as flops_cli
from edm2.utils.distributed import default_device, resolve_device
from edm2.utils.errors import EDM2Error, ExistingFileError, MissingFileError
from helpers.cli import assert_refused


def _flops_parser():
    return build_parser().parse_args(["flops", "--preset", "tiny"])._parser


def test_library_names_become_the_commands_flags():
    p = _flops_parser()
    assert flag_message(p, "label_dim=-1: must be >= 0") == "--label-dim -1: must be >= 0"
    assert flag_message(p, "give `resolution` or `channels`") == "give --resolution or --channels"
    # Words that merely contain an argument name, and paths, stay as they are.
    assert flag_message(p, "/data/config=3/x.png: the config is fine") == "/data/config=3/x.png: the config is fine"


def test_every_command_parser_is_remembered():
    parser = build_parser()
    for argv in (["flops", "--preset", "tiny"], ["dataset", "info", "x.zip"], ["metrics", "calc", "--images", "x",
                                                                               "--ref", "r.npz"]):
        args = parser.parse_args(argv)
        dests = {a.dest for a in args._parser._actions}
        assert "func" not in dests and len(dests) > 1
        assert args._parser.prog.startswith("edm2 " + argv[0])


def test_edm2_error_is_one_line_with_flags_and_exit_2(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise EDM2Error("label_dim=7: no such\nthing")
    monkeypatch.setattr(flops_cli, "count_network", refuse)
    with pytest.raises(SystemExit) as e:
        main(["flops", "--preset", "tiny"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "edm2 flops: error: --label-dim 7: no such thing\n"


def test_file_errors_of_edm2_are_edm2_errors():
    assert issubclass(MissingFileError, EDM2Error) and issubclass(MissingFileError, FileNotFoundError)
    assert issubclass(ExistingFileError, EDM2Error) and issubclass(ExistingFileError, FileExistsError)
    assert str(MissingFileError("net=x.safetensors: no such file")) == "net=x.safetensors: no such file"


def test_os_refusal_is_one_line_exit_1(monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "/out/x.png")
    monkeypatch.setattr(flops_cli, "count_network", full)
    with pytest.raises(SystemExit) as e:
        main(["flops", "--preset", "tiny"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/out/x.png" in err[0]


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"), ValueError("bug"),
                                   KeyError("k")])
def test_other_exceptions_keep_their_traceback(monkeypatch, error):
    """A torch RuntimeError (or a plain ValueError from a bug) is not a user
    error: it propagates out of main, so the interpreter prints its traceback."""
    def crash(*args, **kwargs):
        raise error
    monkeypatch.setattr(flops_cli, "count_network", crash)
    with pytest.raises(type(error)):
        main(["flops", "--preset", "tiny"])


def test_traceback_reaches_the_terminal(tmp_path):
    """End to end: a RuntimeError raised inside a command prints Python's traceback."""
    script = tmp_path / "crash.py"
    script.write_text("import sys\nfrom edm2.cli import flops, main\n"
                      "def crash(*a, **k):\n    raise RuntimeError('inside torch')\n"
                      "flops.count_network = crash\nsys.exit(main(['flops', '--preset', 'tiny']))\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: inside torch" in result.stderr


# ---------------------------------------------------------------------------
# Ctrl-C: one line, exit 130, nothing half-written.
# ---------------------------------------------------------------------------

def test_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(flops_cli, "count_network", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["flops", "--preset", "tiny"])
    assert e.value.code == 130
    assert capsys.readouterr().err == "edm2 flops: interrupted; rerun the same command\n"


def test_ctrl_c_stops_training_cleanly_and_the_run_resumes(tmp_path, image_dataset):
    """End to end: SIGINT to `python -m edm2 train` in the middle of a run: one line,
    exit 130, no temp or lock files; the same command resumes from the last checkpoint."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "edm2", "train", "--outdir", str(out), "--data", str(image_dataset),
            "--preset", "tiny", "--batch", "8", "--duration", "64Ki", "--status", "8", "--snapshot", "64Ki",
            "--checkpoint", "16", "--grid", "0", "--workers", "0"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 60
        while not list(out.glob("checkpoint-*.pt")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "edm2 train: interrupted; rerun the same command to resume"
    left = [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".edm2.lock")]
    assert left == []
    newest = max(int(p.stem.split("-")[1]) for p in out.glob("checkpoint-*.pt"))
    resumed = subprocess.run([*argv, "--slice", "8"], capture_output=True, text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from checkpoint-{newest:012d}.pt at {newest} images" in (out / "log.txt").read_text()


# ---------------------------------------------------------------------------
# --device: one check (edm2.utils.distributed.resolve_device) for every command.
# ---------------------------------------------------------------------------

def _device_commands(t):
    """A parsable command line of every command that has --device (inputs need not exist)."""
    return [["train", "--outdir", t / "run", "--preset", "tiny"],
            ["generate", "--net", t / "n.safetensors", "--outdir", t / "imgs"],
            ["metrics", "ref", "--data", t / "d", "--dest", t / "r.npz"],
            ["metrics", "calc", "--images", t / "imgs", "--ref", t / "r.npz"],
            ["metrics", "gen", "--net", t / "n.safetensors", "--ref", t / "r.npz"],
            ["sweep", "--rundir", t / "run", "--std", "0.1", "--ref", t / "r.npz"],
            ["dataset", "encode", "--source", t / "d", "--dest", t / "l.zip"],
            ["dataset", "decode", "--source", t / "l.zip", "--dest", t / "d2"],
            ["dynamics", "measure", t / "run"],
            ["probe", "--net", t / "n.safetensors"]]


def test_every_command_with_device_has_the_one_check(tmp_path):
    parser = build_parser()
    with_device = set()
    for action in parser._subparsers._group_actions[0].choices.values():
        subs = [a for a in action._actions if isinstance(a, type(parser._subparsers._group_actions[0]))]
        for p in [p for s in subs for p in s.choices.values()] or [action]:
            if any("--device" in a.option_strings for a in p._actions):
                with_device.add(p.prog)
    listed = {parser.parse_args([str(a) for a in argv])._parser.prog for argv in _device_commands(tmp_path)}
    assert listed == with_device


@pytest.mark.parametrize("device,cuda,match", [
    ("cuda", False, "--device cuda: CUDA is not available here"),
    ("cuda:1", False, "--device cuda:1: CUDA is not available here"),
    ("cuda:99", None, "--device cuda:99"),    # no such GPU, with or without CUDA
    ("gpu0", None, "--device gpu0: not a device"),
])
def test_a_device_this_machine_lacks_is_refused_by_every_command(tmp_path, monkeypatch, device, cuda, match):
    if cuda is False:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in _device_commands(tmp_path):
        assert_refused([*argv, "--device", device], watch=[tmp_path], match=[match, "--device cpu" if cuda is False
                                                                            else "--device"], code=2)
    assert not any(tmp_path.iterdir())


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("") == default_device()
    with pytest.raises(EDM2Error, match="device=cuda:99"):
        resolve_device("cuda:99")
