"""edm2.ema.trackers as a standalone tool: exact power-function EMA of any module when
updated every k steps, its snapshots, and post-hoc reconstruction from them."""
import numpy as np
import pytest
import torch

from edm2.ema import trackers as ema_mod
from edm2.ema.posthoc import find_phema_inputs, plan_posthoc
from edm2.ema.profiles import profile_inner_product, std_to_exp
from edm2.ema.trackers import PowerFunctionEMA, reconstruct_state_dict
from edm2.io.snapshot import read_snapshot_meta

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 4
STEPS = 96
TRACKED = (0.05, 0.10)
UNTRACKED = 0.07


class Small(torch.nn.Module):
    """A small model with parameters, float buffers (running stats) and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 8)
        self.bn = torch.nn.BatchNorm1d(8)  # running_mean/var (float, averaged), num_batches_tracked (int, copied)
        self.fc2 = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _flat(module) -> np.ndarray:
    """Parameters and float buffers (the averaged tensors) as one float64 vector."""
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in ema_mod._averaged(module)])


def _train(k, sigma_rels, outdir=None, snapshot_every=None, dtype=torch.float64):
    """STEPS Adam steps of Small on random data; trackers updated every k steps.
    Returns (trackers, update times, raw averaged weights at the update times, final net)."""
    torch.manual_seed(0)
    net = Small()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    trackers = [PowerFunctionEMA(net, sigma_rels, dtype=dtype, outdir=outdir, snapshot_every=snapshot_every)]
    times, raws = [], []
    gen = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        x = torch.randn(BATCH, 3, generator=gen)
        loss = (net(x) - x[:, :2].sin()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % k == 0:
            for tr in trackers:
                tr.update(net, step * BATCH)  # the true image count: beta is exact for any k
            times.append(step * BATCH)
            raws.append(_flat(net))
    return trackers[0], np.asarray(times, np.float64), np.stack(raws), net


def _power_average(times, raws, sigma_rel):
    """Power-function average (Eq. 127 unrolled) of the trajectory held constant
    between update times: sum_j theta_j (t_j^(g+1) - t_{j-1}^(g+1)) / t_J^(g+1)."""
    g = std_to_exp(sigma_rel)
    edges = np.concatenate([[0.0], times]) / times[-1]
    w = np.diff(edges ** (g + 1))
    return w @ raws


@pytest.mark.parametrize("k", [1, 3, 8])
def test_tracked_ema_is_the_exact_power_function_average_when_updating_every_k_steps(k):
    tracker, times, raws, net = _train(k, TRACKED + (UNTRACKED,))
    assert tracker.nimg == STEPS * BATCH
    for s in TRACKED + (UNTRACKED,):
        got = _flat(tracker.nets[s])
        want = _power_average(times, raws, s)
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel <= 1e-6, (k, s, rel)
        if k > 1:
            # The decay of a single step, (1 - 1/step)^(gamma+1), applied every k steps
            # (what a tracker that ignores the time since its last update does) is
            # clearly off: the test can tell the two apart.
            wrong = raws[0]
            for j in range(1, len(times)):
                beta = (1 - BATCH / times[j]) ** (std_to_exp(s) + 1)
                wrong = beta * wrong + (1 - beta) * raws[j]
            assert np.abs(wrong - want).max() / np.abs(want).max() > 1e-3
    # The integer buffer is the live one, not an average.
    assert int(tracker.nets[0.05].bn.num_batches_tracked) == int(net.bn.num_batches_tracked) == STEPS


@pytest.mark.parametrize("k", [1, 3, 8])
def test_posthoc_reconstruction_of_an_untracked_length_matches_direct_tracking(tmp_path, k):
    """Every stored profile p_i is tracked exactly (test above), so the reconstruction
    is the integral of p_hat = sum_i X_i p_i against the piecewise-constant
    trajectory theta(tau), and the direct tracking is the integral of p. As both
    integrate to 1, for any constant c, per coordinate (Cauchy-Schwarz):
        |theta_hat - theta_direct| = |int (p_hat - p)(theta - c)| <= ||p_hat - p|| ||theta - c||
                                   = fit_error * ||p|| * ||theta - c||_L2[0, t],
    with fit_error the relative L2 error of the realised profile that edm2.ema.profiles
    computes exactly. On top come float32 rounding of the streamed combination
    (|X| . |theta| times a few float32 ulps)."""
    every = 8 * BATCH  # 12 snapshot times: at the first update on or after every 8th step
    tracker, times, raws, _ = _train(k, TRACKED + (UNTRACKED,), outdir=None)
    snap, _, _, _ = _train(k, TRACKED, outdir=tmp_path, snapshot_every=every)
    direct = _flat(tracker.nets[UNTRACKED])

    state = reconstruct_state_dict(tmp_path, UNTRACKED)
    model = reconstruct_state_dict(tmp_path, UNTRACKED, model=Small())
    got = _flat(model)
    assert all(torch.equal(v, state[n]) for n, v in model.state_dict().items())

    inputs = find_phema_inputs(tmp_path)
    assert len(inputs) == 2 * STEPS // 8
    plan = plan_posthoc([r.nimg for r in inputs], [r.sigma_rel for r in inputs], [UNTRACKED], times[-1], inputs)
    t = times[-1]
    eps, p_norm = float(plan.fit_error[0]), float(np.sqrt(profile_inner_product(t, UNTRACKED, t, UNTRACKED)))
    dt = np.diff(np.concatenate([[0.0], times]))
    c = dt @ raws / t
    theta_norm = np.sqrt(dt @ (raws - c) ** 2)
    stored = np.stack([_flat_file(r.path) for r in inputs])
    rounding = 8 * 2.0 ** -24 * (np.abs(plan.coeffs[:, 0]) @ np.abs(stored))
    bound = eps * p_norm * theta_norm + rounding
    err = np.abs(got - direct)
    assert np.all(err <= bound), (k, (err / bound).max())
    # The bound is informative: well below the gap to the nearest tracked profile.
    gap = np.abs(_flat(snap.nets[0.05]) - direct).max()
    assert bound.max() < 0.25 * gap, (k, bound.max(), gap)
    assert err.max() < 0.05 * gap, (k, err.max(), gap)


def _flat_file(path):
    from safetensors.torch import load_file

    state = load_file(str(path))
    names = [n for n, _ in Small().named_parameters()]
    names += [n for n, b in Small().named_buffers() if b.is_floating_point()]
    return np.concatenate([state[n].double().reshape(-1).numpy() for n in names])


def test_snapshots_are_edm2_snapshots_and_integer_buffers_are_copied(tmp_path):
    snap, times, _, net = _train(4, TRACKED, outdir=tmp_path, snapshot_every=16 * BATCH, dtype=torch.float32)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"snapshot-{n:012d}-{s:.3f}.safetensors" for n in range(64, STEPS * BATCH + 1, 64)
                     for s in TRACKED]
    meta = read_snapshot_meta(tmp_path / files[-1])
    assert meta["nimg"] == STEPS * BATCH and meta["ema_std"] == 0.10 and meta["net_kwargs"] is None
    assert meta["origin"]["module"].endswith("Small")
    state = reconstruct_state_dict(tmp_path, [0.06, 0.08], at=STEPS * BATCH // 2)
    assert len(state) == 2 and state[0]["bn.num_batches_tracked"].dtype == torch.int64
    # Copied from the latest input at or before `at`: the count at that time.
    assert int(state[0]["bn.num_batches_tracked"]) == STEPS // 2
    assert state[0]["fc1.weight"].dtype == torch.float32
    # The CLI reads the same folder: `edm2 phema` writes files that equal the in-memory result.
    from edm2.cli import main

    main(["phema", "--rundir", str(tmp_path), "--outdir", str(tmp_path / "ph"), "--std", "0.06",
          "--at-nimg", str(STEPS * BATCH // 2)])
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "ph" / f"snapshot-{STEPS * BATCH // 2:012d}-0.060.safetensors"))
    one = reconstruct_state_dict(tmp_path, 0.06, at=STEPS * BATCH // 2)  # same outputs list -> same float32 GEMM
    assert set(written) == set(one) and all(torch.equal(written[k], one[k]) for k in written)
    assert all(torch.allclose(one[k].double(), state[0][k].double(), rtol=1e-5, atol=1e-6) for k in one)


def test_state_dict_round_trip_with_the_image_count():
    a, _, _, net = _train(3, TRACKED)
    b = PowerFunctionEMA(Small(), TRACKED, dtype=torch.float64)
    b.load_state_dict(a.state_dict(), nimg=a.nimg)
    assert b.nimg == a.nimg == STEPS * BATCH
    b.update(net, a.nimg + 3 * BATCH)  # continues with the right decay
    a.update(net, a.nimg + 3 * BATCH)
    pairs = zip(a.nets[0.05].state_dict().values(), b.nets[0.05].state_dict().values())
    assert all(torch.equal(x, y) for x, y in pairs)
    # Without the count, the next update needs batch_size.
    c = PowerFunctionEMA(Small(), TRACKED)
    c.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="pass `batch_size`"):
        c.update(net, a.nimg + BATCH)
    c.update(net, a.nimg + BATCH, BATCH)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma_rel"):
        PowerFunctionEMA(Small(), [0.3])
    with pytest.raises(ValueError, match="both"):
        PowerFunctionEMA(Small(), [0.05], outdir="x")
    with pytest.raises(ValueError, match="no update yet"):
        PowerFunctionEMA(Small(), [0.05]).save_snapshots("unused")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        reconstruct_state_dict("/nonexistent/run", 0.05)
