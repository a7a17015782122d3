"""edm2.train.log's logging backends (`--log tensorboard,wandb`), tested offline
with stand-in modules: what is logged against which axis, one W&B run continued
on resume, and the one-line refusal of a backend that is not installed."""
import sys
import types

import pytest

from edm2.train.config import TrainConfig
from edm2.train.log import parse_log_backends
from edm2.train.loop import train
from edm2.utils.errors import EDM2Error
from helpers.cli import assert_refused

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(preset="tiny", batch=8, duration=16, status=8, snapshot=16, checkpoint=16, grid=0, workers=0,
                progress=False)


class FakeSummaryWriter:
    writers = []

    def __init__(self, logdir):
        self.logdir, self.scalars, self.closed = logdir, [], False
        FakeSummaryWriter.writers.append(self)

    def add_scalar(self, tag, value, global_step=None, walltime=None):
        self.scalars.append((tag, value, global_step, walltime))

    def flush(self):
        pass

    def close(self):
        self.closed = True


class FakeWandbRun:
    def __init__(self, **kwargs):
        self.init, self.metrics, self.logged, self.finished = kwargs, [], [], False

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, data):
        self.logged.append(dict(data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    FakeSummaryWriter.writers = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    return FakeSummaryWriter.writers


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []

    def init(**kwargs):
        runs.append(FakeWandbRun(**kwargs))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return runs


def test_tensorboard_scalars_against_images_and_wall_clock(tmp_path, image_dataset, fake_tensorboard):
    train(TrainConfig(outdir=str(tmp_path / "run"), data=str(image_dataset), log="tensorboard", **SETTINGS))
    [writer] = fake_tensorboard
    assert writer.logdir == str(tmp_path / "run" / "tensorboard") and writer.closed
    tags = {tag for tag, *_ in writer.scalars}
    assert {"train/loss", "train/lr", "train/sec_per_kimg"} <= tags
    assert not tags & {"train/time", "train/kimg", "train/nimg"}   # axes, not scalars
    assert sorted({step for _, _, step, _ in writer.scalars}) == [0, 8, 16]
    assert all(isinstance(wall, float) and wall > 1.7e9 for *_, wall in writer.scalars)


def test_no_backend_unless_asked(tmp_path, image_dataset, fake_tensorboard, fake_wandb):
    train(TrainConfig(outdir=str(tmp_path / "run"), data=str(image_dataset), **SETTINGS))
    assert fake_tensorboard == [] and fake_wandb == []
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_wandb_one_run_continued_on_resume(tmp_path, image_dataset, fake_wandb):
    out = tmp_path / "run"
    for duration in (16, 32):
        train(TrainConfig(outdir=str(out), data=str(image_dataset), log="wandb",
                          **{**SETTINGS, "duration": duration}))
    first, second = fake_wandb
    assert first.init["id"] == second.init["id"] and second.init["resume"] == "allow"
    assert first.init["name"] == "run" and first.init["dir"] == str(out) and first.init["config"]["batch"] == 8
    assert ("*", "nimg") in first.metrics and first.finished and second.finished
    assert [r["nimg"] for r in first.logged + second.logged] == [0, 8, 16, 16, 24, 32]
    assert all(r["kimg"] == r["nimg"] / 1000 and "train/time" not in r and "train/kimg" not in r
               for r in first.logged)
    assert "train/loss" not in first.logged[0] and "train/loss" in first.logged[1]   # NaN (no images yet): left out
    train(TrainConfig(outdir=str(out), data=str(image_dataset), log="wandb", force_new=True, **SETTINGS))
    assert fake_wandb[2].init["id"] != first.init["id"]   # starting over: a new W&B run


def test_backend_names_are_checked():
    assert parse_log_backends(None) == parse_log_backends("") == ()
    with pytest.raises(EDM2Error, match="log=mlflow: unknown logging backend 'mlflow'"):
        parse_log_backends("mlflow")


@pytest.mark.parametrize("backend", ["wandb", "tensorboard"])
def test_a_backend_that_is_not_installed_is_refused(tmp_path, image_dataset, monkeypatch, backend):
    module = "wandb" if backend == "wandb" else "torch.utils.tensorboard"
    monkeypatch.setitem(sys.modules, module, None)   # import fails as if not installed
    assert_refused(["train", "--outdir", tmp_path / "run", "--data", image_dataset, "--preset", "tiny",
                    "--log", f"{backend}"], watch=[tmp_path],
                   match=[f"--log {backend}: the {backend} package is not installed",
                          f"pip install 'edm2[{backend}]'"], code=2)
    assert not (tmp_path / "run").exists()
