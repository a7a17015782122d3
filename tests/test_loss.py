"""Loss (paper App. B.2, Eq. 21), learning-rate schedule, presets and the FLOP counter."""
import math
import re
from pathlib import Path

import pytest
import torch

from edm2.analysis.flops import count_network
from edm2.loss import EDM2Loss, learning_rate_schedule
from edm2.presets import PRESETS, get_preset


class ConstantNet:
    """D(x; sigma) = a * x with a constant log-variance u; records the sigma it saw."""

    def __init__(self, a=0.0, u=0.3):
        self.a, self.u, self.sigma = a, u, None

    def __call__(self, x, sigma, labels=None, return_logvar=False):
        self.sigma = sigma
        return self.a * x, torch.full_like(sigma, self.u)


def test_loss_closed_form():
    y = torch.randn(6, 2, 4, 4)
    net = ConstantNet(a=0.0, u=0.3)
    gen = torch.Generator().manual_seed(5)
    loss = EDM2Loss(P_mean=-0.4, P_std=1.0, sigma_data=0.5)(net, y, generator=gen)
    s = net.sigma
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    assert loss.shape == y.shape
    assert torch.allclose(loss, weight / math.exp(0.3) * y ** 2 + 0.3, rtol=1e-6)


def test_loss_with_identity_denoiser_measures_the_noise():
    # D = noisy input: the error is exactly the added noise n ~ N(0, sigma^2).
    y = torch.zeros(4096, 1, 2, 2)
    net = ConstantNet(a=1.0, u=0.0)
    loss = EDM2Loss(P_mean=0.0, P_std=0.5, sigma_data=0.5)(net, y, generator=torch.Generator().manual_seed(0))
    s = net.sigma
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    normalized = loss / (weight * s ** 2)  # = (n / sigma)^2 ~ chi^2_1, mean 1
    assert normalized.mean().item() == pytest.approx(1, abs=0.03)


def test_sigma_distribution():
    net = ConstantNet()
    EDM2Loss(P_mean=-0.8, P_std=1.6)(net, torch.zeros(20000, 1, 1, 1), generator=torch.Generator().manual_seed(1))
    ln = net.sigma.log().flatten()
    # Standard errors: 1.6 / sqrt(20000) = 0.011 for the mean; about 0.008 for the std.
    assert ln.mean().item() == pytest.approx(-0.8, abs=0.05)
    assert ln.std().item() == pytest.approx(1.6, abs=0.04)


def test_loss_generator_reproducible():
    y = torch.randn(3, 1, 4, 4)
    a = EDM2Loss()(ConstantNet(), y, generator=torch.Generator().manual_seed(9))
    b = EDM2Loss()(ConstantNet(), y, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_learning_rate_schedule_points():
    kw = dict(batch_size=2048, ref_lr=0.01, ref_batches=70000, rampup_Mimg=10)
    assert learning_rate_schedule(0, **kw) == 0  # the first step has lr 0
    assert learning_rate_schedule(5_000_000, **kw) == pytest.approx(0.005)  # half-way through warm-up
    assert learning_rate_schedule(10_000_000, **kw) == pytest.approx(0.01)
    ref = 70000 * 2048
    assert learning_rate_schedule(ref, **kw) == pytest.approx(0.01)
    assert learning_rate_schedule(4 * ref, **kw) == pytest.approx(0.005)  # 1/sqrt(4)
    assert learning_rate_schedule(100 * ref, **kw) == pytest.approx(0.001)
    # A factor is skipped when its parameter is <= 0.
    assert learning_rate_schedule(0, 2048, 0.01, ref_batches=0, rampup_Mimg=0) == 0.01
    assert learning_rate_schedule(4 * ref, 2048, 0.01, ref_batches=70000, rampup_Mimg=0) == pytest.approx(0.005)


def test_presets_table():
    s = get_preset("img512-s")
    assert (s.model_channels, s.lr, s.decay, s.dropout, s.P_mean, s.P_std, s.duration) == (
        192, 0.0100, 70000, 0.0, -0.4, 1.0, 2048 * 2 ** 20)
    assert get_preset("img64-xl").duration == 640 * 2 ** 20 and get_preset("img64-xl").P_std == 1.6
    assert get_preset("img512-xxl").lr == 0.0065 and get_preset("img512-m").dropout == 0.10
    assert sum(n.startswith("img") for n in PRESETS) == 12
    for name in ("cpu-32", "tiny"):
        kw = get_preset(name).net_kwargs(10)
        assert kw["label_dim"] == 10 and kw["img_resolution"] >= 8


def test_demo_preset_is_cpu32_with_the_measured_schedule():
    demo, cpu = get_preset("demo"), get_preset("cpu-32")
    assert demo.net_kwargs(10) == cpu.net_kwargs(10)            # same network as cpu-32
    assert (demo.duration, demo.batch, demo.lr, demo.decay) == (32 * 1024, 32, 0.02, 512)
    assert demo.duration % demo.snapshot == 0 and demo.snapshot % demo.batch == 0
    # The schedule: 0.02 until 512 batches (16Ki images), then 0.02 / sqrt(t / 16Ki) (Eq. 67).
    lr = [learning_rate_schedule(n, demo.batch, demo.lr, demo.decay, demo.rampup_Mimg) for n in (8192, 16384, 32768)]
    assert lr[0] == lr[1] == 0.02 and lr[2] == pytest.approx(0.02 / math.sqrt(2))
    assert get_preset("demo", "E").decay == demo.decay


def test_make_demo_guides_with_a_snapshot_the_demo_preset_writes():
    """`make demo` autoguides with the run's own early snapshot: its file name must be one the preset writes
    (a multiple of the snapshot interval within the run, at a tracked EMA length), and the main net must be
    a later, longer-EMA one."""
    demo = get_preset("demo")
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    rule = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    found = re.search(r"--gnet demo-run/snapshot-(\d{12})-(\d\.\d{3})\.safetensors", rule)
    assert found, "make demo no longer names its guide snapshot"
    nimg, sigma_rel = int(found.group(1)), float(found.group(2))
    assert 0 < nimg < demo.duration and nimg % demo.snapshot == 0
    assert sigma_rel in demo.sigma_rel and sigma_rel < max(demo.sigma_rel)
    assert re.search(r"--guidance 2\b", rule) and "--seeds-per-class 10" in rule


@pytest.mark.parametrize("name,paper", [("img512-xs", 45.5), ("img512-s", 101.9), ("img512-xxl", 552.1)])
def test_flops_match_paper(name, paper):
    r = count_network(name)
    assert abs(r.total / 1e9 - paper) / paper < 0.01
    assert r.macs_matmul < r.total and abs(r.macs_matmul / 1e9 - paper) / paper < 0.015
