"""Every config of the paper's ablation ladder (Table 1) trains end to end with its
own recipe, resumes bit for bit, and its snapshots go through post-hoc EMA (B-G)
and generation."""
from __future__ import annotations

import json

import pytest
import torch

from edm2.cli import main as cli_main
from edm2.ema.posthoc import reconstruct
from edm2.ema.trackers import PowerFunctionEMA, TraditionalEMA
from edm2.io.loading import load_network
from edm2.io.snapshot import list_snapshots, read_snapshot_meta
from edm2.loss import EDM2Loss, EDMLoss
from edm2.nn import CONFIGS
from edm2.train.checkpoint import list_checkpoints, load_checkpoint
from edm2.train.loop import TrainConfig, dry_run, setup, train
from helpers import make_dataset

COMMON = dict(preset="tiny", batch=8, status=16, snapshot=16, checkpoint=16, grid=0, progress=False, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", n=16)


def _final_state(run):
    return load_checkpoint(list_checkpoints(run)[-1][1])


@pytest.mark.parametrize("config", CONFIGS)
def test_config_trains_resumes_bitwise_and_samples(tmp_path, data, config):
    whole = tmp_path / "whole"
    cfg = dict(data=str(data), duration=48 if config == "A" else 32, config=config, **COMMON)  # A: half-life >= 1
    assert train(TrainConfig(outdir=str(whole), **cfg)).finished
    parts = tmp_path / "parts"
    assert not train(TrainConfig(outdir=str(parts), slice=16, **cfg)).finished
    assert train(TrainConfig(outdir=str(parts), **cfg)).finished
    a, b = _final_state(whole), _final_state(parts)
    assert a["nimg"] == b["nimg"] == cfg["duration"]
    for k, v in a["net"].items():
        assert torch.equal(v, b["net"][k]), k
    for key, ema in a["ema"].items():
        for k, v in ema.items():
            assert torch.equal(v, b["ema"][key][k]), (key, k)

    # The snapshots say which config they are, and load as that network.
    snaps = [p for _, _, p in list_snapshots(whole)]
    assert snaps and all(read_snapshot_meta(p).get("config", "G") == config for p in snaps)
    net, _ = load_network(snaps[-1])
    assert getattr(net, "config", "G") == config
    if config == "A":
        with pytest.raises(ValueError, match="traditional EMA"):
            reconstruct(whole, tmp_path / "ph", [0.07], progress=False)
    else:
        out = reconstruct(whole, tmp_path / "ph", [0.07], progress=False,
                          max_profile_error=0.1)  # 2 snapshot times: 5.5 % profile error
        assert getattr(load_network(out[0])[0], "config", "G") == config
    cli_main(["generate", "--net", str(whole), "--outdir", str(tmp_path / "gen"), "--seeds", "0-1", "--steps", "3"])
    assert len(list((tmp_path / "gen").rglob("*.png"))) == 2


@pytest.mark.parametrize("config", CONFIGS)
def test_recipe_drives_loss_optimizer_and_ema(tmp_path, data, config):
    run = setup(TrainConfig(outdir=str(tmp_path / "r"), data=str(data), config=config, **COMMON))
    try:
        assert isinstance(run.loss_fn, EDMLoss if config == "A" else EDM2Loss)
        assert run.opt.param_groups[0]["betas"] == (0.9, 0.999 if config == "A" else 0.99)
        assert isinstance(run.ema, TraditionalEMA if config == "A" else PowerFunctionEMA)
        assert (run.plan.decay > 0) == (config in "EFG")   # inverse-sqrt decay from E on (paper Eq. 67)
        assert json.loads((tmp_path / "r" / "config.json").read_text())["config"] == config
    finally:
        run.close()


def test_dry_run_prints_the_recipe(tmp_path, data):
    text = dry_run(TrainConfig(outdir=str(tmp_path / "r"), data=str(data), config="A", **COMMON))
    assert "config A" in text and "EDM loss" in text and "0.999" in text and "traditional EMA" in text
    assert not (tmp_path / "r").exists()
