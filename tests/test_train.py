"""Training: exact resume, crash safety, DDP and gradient accumulation,
snapshots/grids, and refusal of bad input (edm2.train.loop, `edm2 train`)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edm2.cli import main as cli_main
from edm2.io.loading import load_network
from edm2.io.snapshot import list_snapshots, read_snapshot_meta
from edm2.loss import learning_rate_schedule
from edm2.train.checkpoint import list_checkpoints, load_checkpoint
from edm2.train.loop import TrainConfig, _StreamSampler, setup, start_session, stream_indices, train, train_loop
from helpers import make_dataset

BATCH = 8
# The tiny preset on 16x16 grey images, no sample grids: a step takes a fraction of a second.
COMMON = dict(preset="tiny", batch=BATCH, status=16, snapshot=16, checkpoint=16, grid=0)


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def data(image_dataset):
    """The shared labelled dataset (tests/conftest.py)."""
    return image_dataset


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data):
    """An uninterrupted run of 6 steps (48 images)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train(TrainConfig(outdir=str(out), data=str(data), duration=48, **COMMON))
    assert result.finished and result.nimg == 48
    return out


def _state(run, nimg=None):
    ckpts = list_checkpoints(run)
    path = ckpts[-1][1] if nimg is None else dict(ckpts)[nimg]
    return load_checkpoint(path)


def _assert_bitwise_equal(a, b):
    assert a["nimg"] == b["nimg"]
    for k, v in a["net"].items():
        assert torch.equal(v, b["net"][k]), k
    for std in a["ema"]:
        for k, v in a["ema"][std].items():
            assert torch.equal(v, b["ema"][std][k]), (std, k)


def test_run_folder_contents(reference_run):
    names = {p.name for p in reference_run.iterdir()}
    assert {"config.json", "log.txt", "stats.jsonl", "checkpoint-000000000048.pt"} <= names
    # One snapshot per EMA profile at 0 (fresh run), 16, 32, 48 images, sortable names.
    snaps = list_snapshots(reference_run)
    assert [(n, s) for n, s, _ in snaps] == [(n, s) for n in (0, 16, 32, 48) for s in (0.05, 0.10)]
    meta = read_snapshot_meta(snaps[-1][2])
    assert meta["nimg"] == 48 and meta["ema_std"] == 0.10
    assert meta["dataset"]["resolution"] == 16 and meta["dataset"]["channels"] == 1
    assert meta["dataset"]["label_dim"] == 4 and meta["dataset"]["class_names"] == list("abcd")
    assert meta["encoder"]["type"] == "rgb" and meta["origin"]["preset"] == "tiny"
    net, _ = load_network(reference_run)  # what generation and metrics read
    assert net.label_dim == 4 and net.img_resolution == 16
    # The snapshot at image 0 is the initial network (no EMA update yet); later ones moved away from it.
    first = load_network(snaps[0][2])[0].state_dict()
    state = _state(reference_run)
    assert not torch.equal(first["unet.out_conv.weight"], state["ema"]["0.100000"]["unet.out_conv.weight"])
    # Status records: lr follows Eq. 67 with the image count before the step; the loss is finite.
    stats = [json.loads(line) for line in (reference_run / "stats.jsonl").read_text().splitlines()]
    assert [s["nimg"] for s in stats] == [0, 16, 32, 48]
    for s in stats:
        assert s["lr"] == pytest.approx(learning_rate_schedule(s["nimg"], BATCH, 0.01, 100, 0.0001))
    assert all(np.isfinite(s["loss"]) for s in stats[1:])


def test_stopped_and_resumed_run_is_bitwise_identical(tmp_path, data, reference_run):
    out = tmp_path / "run"
    cfg = dict(outdir=str(out), data=str(data), duration=48, **COMMON)
    first = train(TrainConfig(slice=24, **cfg))  # stops at 24 with a checkpoint (not a multiple of 16)
    assert first.nimg == 24 and not first.finished
    assert [n for n, _ in list_checkpoints(out)] == [16, 24]
    second = train(TrainConfig(**cfg))            # the same command resumes
    assert second.nimg == 48 and second.finished
    assert "resuming from checkpoint-000000000024.pt" in (out / "log.txt").read_text()
    _assert_bitwise_equal(_state(out), _state(reference_run))


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, data, reference_run):
    out = tmp_path / "run"
    cfg = dict(outdir=str(out), data=str(data), duration=48, **COMMON)
    train(TrainConfig(slice=24, **cfg))
    latest = out / "checkpoint-000000000024.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    train(TrainConfig(**cfg))
    log = (out / "log.txt").read_text()
    assert "checkpoint-000000000024.pt: unreadable checkpoint" in log
    assert "resuming from checkpoint-000000000016.pt" in log
    _assert_bitwise_equal(_state(out), _state(reference_run))


_KILLER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    import edm2.train.checkpoint as ck
    real, calls = ck.atomic_write_bytes, []
    def write_then_die(path, data):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half written, then SIGKILL
            with open(path.parent / f".{path.name}.killed.tmp", "wb") as f:
                f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)
    ck.atomic_write_bytes = write_then_die
    from edm2.train.loop import TrainConfig, train
    train(TrainConfig(**json.loads(sys.argv[1])))
""")


def test_sigkill_while_writing_a_checkpoint_loses_nothing(tmp_path, data, reference_run):
    out = tmp_path / "run"
    cfg = dict(outdir=str(out), data=str(data), duration=48, **COMMON)
    proc = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(cfg)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert [n for n, _ in list_checkpoints(out)] == [16]         # 32 never landed
    assert list(out.glob(".checkpoint-*.tmp"))                     # the half-written temp file
    train(TrainConfig(**cfg))
    assert not list(out.glob(".checkpoint-*.tmp"))                 # cleaned up on resume
    assert "resuming from checkpoint-000000000016.pt" in (out / "log.txt").read_text()
    _assert_bitwise_equal(_state(out), _state(reference_run))
    assert [(n, s) for n, s, _ in list_snapshots(out)] == [(n, s) for n, s, _ in list_snapshots(reference_run)]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, data):
    """3 steps of 8 images in one process, no accumulation."""
    out = tmp_path_factory.mktemp("three") / "run"
    train(TrainConfig(outdir=str(out), data=str(data), duration=24, **COMMON))
    return _state(out)


# Same images, same per-sample noise; only the order of floating-point sums
# differs, so after 3 Adam steps the weights agree to about 1e-6.
TOL = 1e-4


def _max_diff(a, b):
    keys = [k for k in a["net"] if a["net"][k].is_floating_point()]
    return max(float((a["net"][k] - b["net"][k]).abs().max()) for k in keys)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, data, three_steps):
    out = tmp_path / "run"
    train(TrainConfig(outdir=str(out), data=str(data), duration=24, batch_gpu=2, **COMMON))  # 4 rounds of 2
    state = _state(out)
    assert _max_diff(state, three_steps) < TOL
    # ... and it is a real comparison: a different seed moves the weights far more.
    other = tmp_path / "other"
    train(TrainConfig(outdir=str(other), data=str(data), duration=24, seed=1, **COMMON))
    assert _max_diff(_state(other), three_steps) > 100 * TOL


def test_channels_last_matches_contiguous_and_may_change_on_resume(tmp_path, data, three_steps):
    out = tmp_path / "run"
    cfg = dict(outdir=str(out), data=str(data), duration=24, **COMMON)
    train(TrainConfig(slice=16, channels_last=True, **cfg))   # 2 steps in channels_last ...
    assert train(TrainConfig(**cfg)).finished                  # ... resumed without it (a session setting)
    assert "resuming from checkpoint-000000000016.pt" in (out / "log.txt").read_text()
    assert _max_diff(_state(out), three_steps) < TOL


def test_compiled_training_matches_eager(tmp_path, data, three_steps):
    """--compile: the same three steps, with MPConv's forced weight normalisation
    done eagerly around the compiled network (left out, the initial weights'
    per-channel RMS would stay off 1 and the states differ by about 1e-1)."""
    out = tmp_path / "run"
    train(TrainConfig(outdir=str(out), data=str(data), duration=24, compile=True, **COMMON))
    state = _state(out)
    assert _max_diff(state, three_steps) < TOL
    w = next(v for k, v in state["net"].items() if k.endswith("weight") and v.ndim == 4)
    rms = w.flatten(1).square().mean(1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=2.5e-2)


def test_two_process_ddp_matches_one_process(tmp_path, data, three_steps):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "edm2", "train", "--outdir", str(out), "--data", str(data), "--preset", "tiny", "--batch", "8",
           "--duration", "24", "--status", "16", "--snapshot", "16", "--checkpoint", "16", "--grid", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch 8 (2 process(es) x 4 x 1 round(s))" in (out / "log.txt").read_text()
    assert _max_diff(_state(out), three_steps) < TOL


def test_data_order_is_a_function_of_position():
    size, seed = 10, 3
    stream = stream_indices(size, seed, range(30))
    for e in range(3):  # every epoch is a permutation of the dataset
        assert sorted(stream[10 * e:10 * e + 10]) == list(range(size))
    assert stream[:10] != stream[10:20]
    # Two processes with micro-batches of 2 see exactly the one-process stream, split.
    one = _StreamSampler(size, seed, 0, 8, 8, 0, 1)
    two = [_StreamSampler(size, seed, 0, 8, 2, r, 2) for r in range(2)]
    it1, it2 = iter(one), [iter(s) for s in two]
    for _ in range(4):
        want = next(it1)
        got = [i for it in it2 for _ in range(2) for i in next(it)]
        assert got == want
    # Resuming at image 16 continues the same stream.
    assert next(iter(_StreamSampler(size, seed, 16, 8, 8, 0, 1))) == stream[16:24]


def test_sample_grid_rows_are_classes(tmp_path, data):
    out = tmp_path / "run"
    train(TrainConfig(outdir=str(out), data=str(data), duration=8, **dict(COMMON, snapshot=8, grid=4)))
    grid = Image.open(out / "grid-000000000008.png")
    assert grid.size == (1 * 16, 4 * 16)  # 4 classes (rows) x 1 seed
    assert not (out / "grid-000000000000.png").exists()


@pytest.mark.parametrize("label_dim,count", [(10, 10), (10, 30), (0, 9)])
def test_sample_grid_matches_generation_row_by_row(tmp_path, monkeypatch, label_dim, count):
    """The grid batches its rows (GRID_BATCH images per sampler call); the pixels
    are those of generating each class row (or the seeds in order) on its own."""
    from edm2.encoders import StandardRGBEncoder
    from edm2.generate import generate_images
    from edm2.nn import Precond
    from edm2.train import log as trainlog

    torch.manual_seed(0)
    net = Precond(img_resolution=8, img_channels=1, label_dim=label_dim, model_channels=8, channel_mult=(1, 2),
                  num_blocks=1, attn_resolutions=(), channels_per_head=8).eval()
    with torch.no_grad():
        for q in net.parameters():
            if q.ndim == 0:
                q.fill_(0.5)   # gains off zero: the samples depend on the network
    enc = StandardRGBEncoder()
    monkeypatch.setattr(trainlog, "GRID_BATCH", 7)   # batches that straddle rows
    trainlog.save_grid(tmp_path / "grid.png", net, enc, count, "cpu")
    grid = np.asarray(Image.open(tmp_path / "grid.png")).astype(int)
    rows = 10 if label_dim else 3
    cols = count // rows
    assert grid.shape == (rows * 8, cols * 8)
    for row in range(rows):
        seeds = range(cols) if label_dim else range(row * cols, (row + 1) * cols)
        b = next(generate_images(net, enc, seeds, class_idx=row if label_dim else None, batch_size=cols,
                                 rank=0, world_size=1))
        want = b.images[:, 0].permute(1, 0, 2).reshape(8, cols * 8).numpy().astype(int)
        got = grid[row * 8:(row + 1) * 8]
        assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.99


def test_latent_dataset_trains_in_standardised_latent_space(tmp_path):
    ds = tmp_path / "latents"
    ds.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        mean = rng.normal(0, 4, [4, 8, 8]).astype(np.float32)
        np.save(ds / f"{i}.npy", np.concatenate([mean, np.full_like(mean, 0.1)]))
    out = tmp_path / "run"
    train(TrainConfig(outdir=str(out), data=str(ds), duration=8, **dict(COMMON, snapshot=8)))
    meta = read_snapshot_meta(list_snapshots(out)[-1][2])
    assert meta["encoder"]["type"] == "sd-vae" and meta["dataset"]["channels"] == 4
    assert meta["net_kwargs"]["img_channels"] == 4 and meta["dataset"]["label_dim"] == 0


def test_init_starts_from_another_network(tmp_path, data, reference_run):
    out = tmp_path / "finetune"
    train(TrainConfig(outdir=str(out), data=str(data), duration=8, init=str(reference_run), **COMMON))
    start = load_network(out / "snapshot-000000000000-0.100.safetensors")[0].state_dict()
    init = load_network(reference_run)[0].state_dict()  # its latest, longest EMA
    assert all(torch.equal(v, init[k]) for k, v in start.items())
    assert read_snapshot_meta(out / "snapshot-000000000000-0.100.safetensors")["net_kwargs"]["label_dim"] == 4


# ---------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written.
# ---------------------------------------------------------------------------

def _fails(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edm2 train: error:") and "\n" not in err, err
    return err


def _listing(folder):
    return sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in Path(folder).rglob("*"))


def test_bad_data_is_refused(tmp_path, capsys, data):
    out = tmp_path / "out"
    assert "does not exist" in _fails(capsys, "--outdir", str(out), "--data", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "holds no images" in _fails(capsys, "--outdir", str(out), "--data", str(tmp_path / "empty"))
    bad = make_dataset(tmp_path / "bad", n=6, labels=False)
    (bad / "0003.png").write_bytes(b"not a png at all")
    assert "0003.png" in _fails(capsys, "--outdir", str(out), "--data", str(bad), "--preset", "tiny")
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    Image.fromarray(np.zeros([16, 16, 4], np.uint8)).save(rgba / "a.png")
    assert "RGBA" in _fails(capsys, "--outdir", str(out), "--data", str(rgba), "--preset", "tiny")
    nolabels = make_dataset(tmp_path / "nolabels", n=4, labels=False)
    assert "--cond" in _fails(capsys, "--outdir", str(out), "--data", str(nolabels), "--cond", "--preset", "tiny")
    assert "--duration 20" in _fails(capsys, "--outdir", str(out), "--data", str(data), "--preset", "tiny",
                                     "--duration", "20")
    assert "--snapshot 12" in _fails(capsys, "--outdir", str(out), "--data", str(data), "--preset", "tiny",
                                     "--snapshot", "12")
    assert "--batch-gpu 3" in _fails(capsys, "--outdir", str(out), "--data", str(data), "--preset", "tiny",
                                     "--batch-gpu", "3")
    assert not out.exists()


def test_a_different_run_in_outdir_is_refused_unless_force_new(tmp_path, capsys, data, reference_run):
    before = _listing(reference_run)
    base = ["--outdir", str(reference_run), "--data", str(data), "--preset", "tiny", "--batch", "8", "--status", "16",
            "--snapshot", "16", "--checkpoint", "16", "--grid", "0"]
    err = _fails(capsys, *base, "--duration", "48", "--lr", "0.02")
    assert "holds a different run" in err and "lr" in err and "--force-new" in err
    assert _listing(reference_run) == before
    # A folder that is not a run is refused too.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    assert "not an edm2 run" in _fails(capsys, *base[2:], "--outdir", str(other), "--duration", "48")
    # The same command on the finished run resumes and has nothing to do (per-invocation options may change).
    assert cli_main(["train", *base, "--duration", "48", "--workers", "0"]) == 0
    # --force-new keeps the old run aside.
    fresh = tmp_path / "fresh"
    train(TrainConfig(outdir=str(fresh), data=str(data), duration=8, **COMMON))
    assert cli_main(["train", *base[2:], "--outdir", str(fresh), "--duration", "8", "--lr", "0.02", "--force-new"]) == 0
    assert (fresh / "previous-1" / "config.json").is_file()
    assert json.loads((fresh / "config.json").read_text())["lr"] == 0.02


def test_dry_run_writes_nothing(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert cli_main(["train", "--outdir", str(out), "--data", str(data), "--preset", "tiny", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert '"preset": "tiny"' in text and "parameters" in text and "run folder: fresh" in text
    assert not out.exists()


def test_config_a_extended_with_another_duration_keeps_its_ema_halflife(tmp_path, data):
    """Config A's half-life is the paper's fraction of the run's duration (App. B.1), fixed when the run
    starts: extending the run (a resume with a larger duration) keeps it and says so in the log."""
    out = tmp_path / "run"
    cfg = dict(COMMON, outdir=str(out), data=str(data), config="A", status=48, snapshot=48, checkpoint=48)
    train(TrainConfig(duration=48, **cfg))
    assert train(TrainConfig(duration=96, **cfg)).finished
    halflife = 48 * 50e6 / 2 ** 31
    assert json.loads((out / "config.json").read_text())["ema_halflife"] == pytest.approx(halflife)
    metas = {n: read_snapshot_meta(p) for n, _, p in list_snapshots(out)}
    assert set(metas) == {0, 48, 96} and all(m["ema_halflife"] == pytest.approx(halflife) for m in metas.values())
    assert "the EMA half-life stays 1.118 images, as when the run started (duration=96 alone would give 2.235)" \
        in (out / "log.txt").read_text()


def test_a_lone_non_finite_loss_does_not_stop_the_run(tmp_path, data):
    """One step's loss is inf (as an fp16 overflow can make it): its gradients are zeroed, the weights stay
    finite and the run goes on to the end. (A loss that stays non-finite stops it: tests/test_cli_train_refusals.py.)"""
    run = setup(TrainConfig(outdir=str(tmp_path / "run"), data=str(data), duration=32,
                            **dict(COMMON, status=8)))
    real, calls = run.loss_fn, []

    def loss_fn(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("inf") if len(calls) == 2 else loss

    run.loss_fn = loss_fn
    try:
        start_session(run)
        assert train_loop(run).finished
    finally:
        run.close()
    assert "loss nan" in (tmp_path / "run" / "log.txt").read_text()   # 0 * inf: some elements are nan
    state = load_checkpoint(tmp_path / "run" / "checkpoint-000000000032.pt")
    assert all(torch.isfinite(v).all() for v in state["net"].values())
