"""What `edm2 train` refuses: each case exits non-zero with one line naming
the problem and the fix, and leaves every file of the run folder as it was."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from edm2.cli import main as cli_main
from edm2.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from edm2.train.loop import TrainConfig, train
from edm2.utils.fileio import HOLDER_NAME, LOCK_NAME
from helpers import make_dataset
from helpers.cli import fill_disk, hold_lock, small_tmpfs

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(preset="tiny", batch=8, duration=16, status=16, snapshot=16, checkpoint=16, grid=0, workers=0)


def _argv(outdir, data, **changes):
    argv = ["train", "--outdir", str(outdir), "--data", str(data)]
    for name, value in dict(SETTINGS, **changes).items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", n=8)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data):
    """A finished run of 2 steps: config, log, snapshots at 0 and 16 images, a checkpoint at 16."""
    out = tmp_path_factory.mktemp("proto") / "run"
    train(TrainConfig(outdir=str(out), data=str(data), **SETTINGS))
    return out


@pytest.fixture
def run(tmp_path, finished_run):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _hashes(folder):
    """{relative path: sha256} of every file below folder (hidden ones too)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _refused(capsys, argv, status=2):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("edm2 train: error: ") and "\n" not in err, err
    return err


def _truncate_checkpoints(run):
    for _, path in list_checkpoints(run):
        path.write_bytes(path.read_bytes()[:500])


def _rewrite_checkpoints(run, **changes):
    """Each checkpoint saved again with some entries changed (None: removed)."""
    for _, path in list_checkpoints(run):
        state = load_checkpoint(path)
        state.update(changes)
        save_checkpoint(path, {k: v for k, v in state.items() if v is not None and k not in ("format", "version")})


@pytest.fixture
def locked_by_another_process(run):
    with hold_lock(run) as proc:
        yield proc.pid


# (case, how to spoil the run or its command, exit status, what the one line must say)
CASES = [
    ("all checkpoints unreadable", "truncate", {}, 2,
     ["holds a run", "checkpoint(s) are unreadable", "--force-new", "previous-N"]),
    ("second invocation while one runs", "lock", {}, 2, ["is in use by process", LOCK_NAME]),
    ("checkpoint of another seed", "seed", {"duration": "32"}, 2,
     ["checkpoint-000000000016.pt: a checkpoint of seed 5, but the run has --seed 0", "--force-new"]),
    ("checkpoint without the EMA", "no-ema", {"duration": "32"}, 2,
     ["checkpoint-000000000016.pt: not a complete training checkpoint (no ema)"]),
    ("lr nan", None, {"lr": "nan"}, 2, ["--lr nan: must be a finite number > 0"]),
    ("lr negative", None, {"lr": "-1"}, 2, ["--lr -1.0: must be a finite number > 0"]),
    ("P_mean nan", None, {"P_mean": "nan"}, 2, ["--P-mean nan: must be a finite number"]),
    ("P_std zero", None, {"P_std": "0"}, 2, ["--P-std 0.0: must be a finite number > 0"]),
    ("dropout 1.5", None, {"dropout": "1.5"}, 2, ["--dropout 1.5: must be in [0, 1)"]),
    ("loss scaling zero", None, {"loss_scaling": "0"}, 2, ["--loss-scaling 0.0: must be a finite number > 0"]),
    ("decay infinite", None, {"decay": "inf"}, 2, ["--decay inf: must be a finite number >= 0"]),
    ("threads zero", None, {"threads": "0"}, 2, ["--threads 0:", "must be >= 1"]),
    ("config unknown", None, {"config": "Q"}, 2, ["--config 'Q': unknown; allowed: A, B, C, D, E, F, G"]),
    ("config A with ema_std", None, {"config": "A", "ema_std": "0.05,0.1"}, 2,
     ["--ema-std 0.05,0.1: config A keeps a traditional EMA", "allowed with --ema-std: B, C, D, E, F, G"]),
    ("config A too short for its EMA", None, {"config": "A", "duration": "32"}, 2,
     ["--duration 32: config A's EMA half-life", "would be 0.745 images, below 1; use --duration 48 or more"]),
    ("ema_std too wide", None, {"ema_std": "0.05,0.5"}, 2, ["--ema-std [0.5]: every EMA length", "0.2887"]),
    ("ema_std repeated", None, {"ema_std": "0.1,0.1"}, 2, ["--ema-std 0.1,0.1: every value must be different"]),
    ("ema_std same file name", None, {"ema_std": "0.05,0.0504"}, 2,
     ["--ema-std 0.05,0.0504: 0.05 and 0.0504 would share the snapshot file name", "first 3 decimals"]),
    ("rampup negative", None, {"rampup_Mimg": "-0.5"}, 2, ["--rampup-Mimg -0.5: must be a finite number >= 0"]),
    ("seed negative", None, {"seed": "-1"}, 2, ["--seed -1: must be a whole number >= 0"]),
    ("different run", None, {"lr": "0.02"}, 2, ["holds a different run", "lr: 0.01 -> 0.02", "--force-new"]),
    ("seed changed on resume", None, {"seed": "1"}, 2, ["holds a different run", "seed: 0 -> 1"]),
    ("ema_std changed on resume", None, {"ema_std": "0.05"}, 2,
     ["holds a different run", "ema_std: [0.05, 0.1] -> [0.05]"]),
]


@pytest.mark.parametrize("case,spoil,changes,status,says", CASES, ids=[c[0] for c in CASES])
def test_refused_and_nothing_changed(request, capsys, run, data, case, spoil, changes, status, says):
    if spoil == "truncate":
        _truncate_checkpoints(run)
    if spoil in ("seed", "no-ema"):
        _rewrite_checkpoints(run, **({"seed": 5} if spoil == "seed" else {"ema": None}))
    if spoil == "lock":
        pid = request.getfixturevalue("locked_by_another_process")
        says = says + [str(pid)]
    before = _hashes(run)
    err = _refused(capsys, _argv(run, data, **changes), status)
    for text in says:
        assert text in err, (text, err)
    assert _hashes(run) == before


def test_outdir_under_a_file_is_refused_and_nothing_is_written(tmp_path, capsys, data):
    # The run folder cannot be created (a file stands where its parent folder should be):
    # the root user's way to meet an unwritable place, as permission bits do not stop root.
    (tmp_path / "file").write_text("not a folder")
    before = _hashes(tmp_path)
    err = _refused(capsys, _argv(tmp_path / "file" / "run", data), status=1)
    assert "file" in err and "not a folder" in err
    assert _hashes(tmp_path) == before


def test_outdir_that_is_a_file_is_refused(tmp_path, capsys, data):
    (tmp_path / "run").write_text("x")
    before = _hashes(tmp_path)
    err = _refused(capsys, _argv(tmp_path / "run", data))
    assert "exists and is not a folder" in err
    assert _hashes(tmp_path) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="runs as root, which writes into read-only folders regardless of their permissions")
def test_read_only_run_folder_is_refused(capsys, run, data):
    before = _hashes(run)
    run.chmod(0o555)
    try:
        _refused(capsys, _argv(run, data, duration=32), status=1)
    finally:
        run.chmod(0o755)
    assert _hashes(run) == before


# ---------------------------------------------------------------------------
# ... and what they point to works.
# ---------------------------------------------------------------------------

def test_force_new_starts_over_after_unreadable_checkpoints(capsys, run, data):
    _truncate_checkpoints(run)
    old = _hashes(run)
    assert cli_main([*_argv(run, data), "--force-new"]) == 0
    assert _hashes(run / "previous-1") == old            # moved aside, unchanged
    assert [n for n, _ in list_checkpoints(run)] == [16]  # and trained again
    assert not (run / LOCK_NAME).exists()                 # the lock is released


def test_checkpoint_of_an_earlier_version_resumes(run, data):
    """Checkpoints written before the checkpoint's contents were declared once also hold
    `data_position` (always the image count); they resume, and new ones no longer hold it."""
    _rewrite_checkpoints(run, data_position=16)
    assert cli_main(_argv(run, data, duration=32)) == 0
    assert "resuming from checkpoint-000000000016.pt at 16 images" in (run / "log.txt").read_text()
    state = load_checkpoint(run / "checkpoint-000000000032.pt")
    assert sorted(state) == ["ema", "format", "net", "nimg", "optimizer", "seed", "version"]
    assert (state["nimg"], state["seed"]) == (32, 0)


def test_the_lock_of_a_killed_run_is_free(capsys, run, data):
    with hold_lock(run) as proc:
        proc.kill()   # SIGKILL: no cleanup; the OS releases its lock
        proc.wait()
        assert cli_main(_argv(run, data)) == 0               # the run is finished: nothing to do
    assert "nothing to do" in (run / "log.txt").read_text().splitlines()[-1]
    assert "no longer running" in capsys.readouterr().err
    assert not (run / LOCK_NAME).exists() and not (run / HOLDER_NAME).exists()


# (label put in place of item 1's, class_names kept?, what the one line must say)
LABEL_CASES = [
    ("fraction", 1.5, True, ["label 1.5", "not a class index"]),
    ("huge", 10 ** 9, False, ["class index 1000000000", "below 1000"]),
]


@pytest.mark.parametrize("case,label,names,says", LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_bad_dataset_label_is_refused(tmp_path, capsys, data, case, label, names, says):
    ds = shutil.copytree(data, tmp_path / "ds")
    meta = json.loads((ds / "dataset.json").read_text())
    meta["labels"][1][1] = label
    if not names:
        del meta["class_names"]
    (ds / "dataset.json").write_text(json.dumps(meta))
    before = _hashes(tmp_path)
    err = _refused(capsys, _argv(tmp_path / "run", ds))
    for text in says:
        assert text in err, (text, err)
    assert _hashes(tmp_path) == before and not (tmp_path / "run").exists()


def test_full_disk_is_one_line_and_keeps_the_run(tmp_path, capsys, finished_run, data):
    with small_tmpfs(tmp_path / "mnt", size="16m") as (mnt, _):   # the run is 6.4 MB; 12 after the resume
        run = shutil.copytree(finished_run, mnt / "run")
        fill_disk(mnt, leave=8192)       # room for the lock and a log line, not for a snapshot
        before = {name: (run / name).read_bytes() for name in os.listdir(run)}
        err = _refused(capsys, _argv(run, data, duration=32), status=1)
        assert "no space left" in err, err
        # No temp file or lock is left; the logs only grew; snapshots and checkpoint are as they were.
        assert sorted(os.listdir(run)) == sorted(before)
        for name, old in before.items():
            new = (run / name).read_bytes()
            assert new.startswith(old) if name in ("log.txt", "stats.jsonl") else new == old, name
        (mnt / "filler.bin").unlink()                     # space again: the same command continues
        assert cli_main(_argv(run, data, duration=32)) == 0
        assert [n for n, _ in list_checkpoints(run)] == [16, 32]


def test_diverged_training_stops_and_saves_nothing_non_finite(tmp_path, capsys, data):
    """A finite but far too large --lr: the loss turns inf/NaN after a few steps. The command stops with one
    line (the image, the last good checkpoint and snapshot, what to do); no snapshot or checkpoint holds a
    non-finite value; re-running it stops again at the same image and writes nothing new."""
    out = tmp_path / "run"
    argv = _argv(out, data, lr="1e30", duration=64, status=8)
    err = _refused(capsys, argv)
    for text in ["--lr 1e+30: the training diverged: the loss of the step from image 16 is not finite",
                 f"last good checkpoint: {out}/checkpoint-000000000016.pt",
                 f"--init {out}/snapshot-000000000016-0.100.safetensors", "lr may not change on resume",
                 "--force-new"]:
        assert text in err, (text, err)
    assert [n for n, _ in list_checkpoints(out)] == [16]
    assert sorted(p.name for p in out.glob("snapshot-*")) == [f"snapshot-0000000000{n}-{s}.safetensors"
                                                             for n in ("00", "16") for s in ("0.050", "0.100")]
    for path in [*out.glob("snapshot-*"), *out.glob("checkpoint-*")]:
        tensors = load_file(path) if path.suffix == ".safetensors" else load_checkpoint(path)["net"]
        assert all(torch.isfinite(t).all() for t in tensors.values()), path
    assert "stopped: lr=1e+30: the training diverged" in (out / "log.txt").read_text()
    before = _hashes(out)
    err = _refused(capsys, argv)                  # the same command: resumes at 16, stops again, saves nothing
    assert "the step from image 16 is not finite" in err
    after = _hashes(out)
    assert {k: v for k, v in after.items() if k not in ("log.txt", "stats.jsonl")} == \
        {k: v for k, v in before.items() if k not in ("log.txt", "stats.jsonl")}


def test_grid_never_replaces_a_file_it_does_not_own(tmp_path, capsys, data):
    """Sample grids carry the run id: a resume refuses (one line, nothing changed) when a file that is not a
    grid of this run stands where it would write one; its own grids (e.g. after falling back to an earlier
    checkpoint) are written again."""
    out = tmp_path / "run"
    assert cli_main(_argv(out, data, grid=4, duration=32)) == 0
    assert sorted(p.name for p in out.glob("grid-*")) == ["grid-000000000016.png", "grid-000000000032.png"]
    (out / "checkpoint-000000000032.pt").unlink()               # back to image 16: grid 32 is written again
    assert cli_main(_argv(out, data, grid=4, duration=32)) == 0
    assert "resuming from checkpoint-000000000016.pt" in (out / "log.txt").read_text()
    foreign = out / "grid-000000000048.png"
    Image.new("L", (8, 8), 200).save(foreign)                   # the user's own picture, under a grid's name
    before = _hashes(out)
    err = _refused(capsys, _argv(out, data, grid=4, duration=48))
    assert "--outdir" in err and "grid-000000000048.png is not a sample grid of this run" in err, err
    assert "--grid 0" in err and _hashes(out) == before
    assert cli_main(_argv(out, data, grid=0, duration=48)) == 0  # without grids it trains on, the file is kept
    assert _hashes(out)["grid-000000000048.png"] == before["grid-000000000048.png"]


def test_resume_on_a_dataset_whose_images_changed_is_refused(tmp_path, capsys, data):
    ds = shutil.copytree(data, tmp_path / "ds")
    out = tmp_path / "run"
    assert cli_main(_argv(out, ds)) == 0
    Image.new("L", (16, 16), 77).save(ds / "0002.png")        # same name, other pixels
    before = _hashes(tmp_path)
    err = _refused(capsys, _argv(out, ds, duration=32))
    assert f"--data {ds.resolve()}: the dataset's content changed since the run in {out} started" in err, err
    assert "--force-new" in err and _hashes(tmp_path) == before
