"""2D toy example: exact ground truth, toy denoiser, training, post-hoc EMA, CLI."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edm2.cli import main
from edm2.ema.posthoc import reconstruct
from edm2.io.snapshot import snapshot_name
from edm2.sampling import edm_sampler
from edm2.toy import (
    ToyNet,
    ToyNetConfig,
    ToyTrainConfig,
    list_toy_snapshots,
    load_toy,
    load_toy_run,
    posthoc_toy,
    sample_toy,
    toy_noise,
    toy_score,
    train_toy,
    tree_mixture,
)
from edm2.toy.gmm import _tree_components
from helpers.cli import assert_refused

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tree_shape():
    comps = _tree_components()
    assert len(comps) == 2 * 127 * 8              # 2 classes x (2^7 - 1) branches x 8 components
    a, b = tree_mixture("A"), tree_mixture("B")
    assert len(a) == len(b) == 1016 and len(tree_mixture("AB")) == 2032
    # Class A grows towards +x+y, class B the opposite way.
    ma, mb = (a.phi[:, None] * a.mu).sum(0), (b.phi[:, None] * b.mu).sum(0)
    assert ma.min() > 0.1 and mb.max() < -0.1
    with pytest.raises(ValueError, match="choose one of A, B, AB"):
        tree_mixture("C")


def test_logp_matches_direct_density():
    # Independent check: sum_k phi_k N(x; mu_k, Sigma_k + sigma^2 I) with explicit inverse and determinant.
    g = tree_mixture("A")
    comps = [c for c in _tree_components() if c[0] == "A"]
    phi = np.array([c[1] for c in comps]) / sum(c[1] for c in comps)
    mu, cov = np.array([c[2] for c in comps]), np.array([c[3] for c in comps])
    x = np.array([[0.3, 0.4], [0.0, 0.0], [1.0, -0.5], [0.7, 1.1], [0.2, 0.25]])
    for sigma in (0.0, 0.05, 1.0):
        c = cov + sigma ** 2 * np.eye(2)
        y = x[:, None, :] - mu
        m = np.einsum("nki,kij,nkj->nk", y, np.linalg.inv(c), y)
        dens = (phi * np.exp(-0.5 * m) / (2 * np.pi * np.sqrt(np.linalg.det(c)))).sum(1)
        got = g.logp(torch.as_tensor(x), sigma).numpy()
        np.testing.assert_allclose(got[dens > 1e-250], np.log(dens[dens > 1e-250]), rtol=1e-9, atol=1e-9)


def test_score_equals_autograd_of_logp():
    g = tree_mixture("AB")
    gen = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.002, 0.01, 0.1, 0.5, 3.0], dtype=torch.float64).repeat_interleave(40)
    x = g.sample(len(sigma), sigma, generator=gen, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(g.logp(x, sigma).sum(), x)
    score = g.score(x.detach(), sigma)
    assert torch.allclose(score, grad, rtol=1e-7, atol=1e-7 * grad.abs().max())
    # float32 (training precision) stays close where it matters (sigma >= 0.01).
    s32 = g.score(x.detach().float(), sigma, dtype=torch.float32).double()
    big = sigma >= 0.01
    assert ((s32 - score)[big].norm(dim=1) / score[big].norm(dim=1).clamp(min=1)).max() < 1e-3
    # Tweedie denoiser: D = x + sigma^2 score.
    d = g.denoise(x.detach(), sigma)
    assert torch.allclose(d, x.detach() + sigma[:, None] ** 2 * score)


def test_noisy_sampling_moments():
    g = tree_mixture("A")
    sigma = 0.3
    x = g.sample(200_000, sigma, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean = (g.phi[:, None] * g.mu).sum(0)
    second = (g.phi[:, None, None] * (g.Q @ torch.diag_embed(g.L + sigma ** 2) @ g.Q.transpose(1, 2)
                                      + g.mu[:, :, None] * g.mu[:, None, :])).sum(0)
    cov = second - torch.outer(mean, mean)
    assert torch.allclose(x.mean(0), mean, atol=4e-3)
    assert torch.allclose(torch.cov(x.T), cov, atol=6e-3)


def test_exact_denoiser_sampling_reproduces_mixture():
    g = tree_mixture("A")
    samples = sample_toy(g, 1024, seed=3)                              # 32-step Heun from sigma_max = 5
    real = g.sample(4096, generator=torch.Generator().manual_seed(4))
    got, ref = toy_score(samples), toy_score(real)
    assert ref["in_fraction"] > 0.98                                    # the threshold keeps ~99% of real data
    assert abs(got["in_fraction"] - ref["in_fraction"]) < 0.02
    assert abs(got["mean_logp"] - ref["mean_logp"]) < 0.15
    # Sampler trajectories start at sigma_max * noise and end at the samples.
    s2, path = sample_toy(g, 16, seed=3, num_steps=8, trajectories=True)
    assert path.shape == (9, 16, 2)
    assert torch.equal(path[-1], s2) and torch.allclose(path[0], 5 * toy_noise(16, seed=3))
    # The path is the sampler's own states (per-step callback): the same as recording the
    # main net's input at each step's first evaluation, with any solver.
    for solver in ("heun", "dpm++2m"):
        seen = {}

        def recording(x, sigma, labels=None):
            seen.setdefault(float(sigma), []).append(x.clone())
            return g(x, sigma, labels)
        s3, path3 = sample_toy(g, 16, seed=3, num_steps=8, trajectories=True, solver=solver)
        sample_toy(recording, 16, seed=3, num_steps=8, solver=solver)
        firsts = [seen[t][-1] for t in sorted(seen, reverse=True)]
        assert all(torch.equal(a, b) for a, b in zip(path3[:-1], firsts)) and len(firsts) == 8


def test_toynet_preconditioning_and_denoiser():
    torch.manual_seed(0)
    net = ToyNet(ToyNetConfig(num_layers=2, hidden_dim=16))
    x = torch.randn(100, 2)
    # out_gain = 0 at init: log p is the Gaussian N(0, sigma^2 + sigma_data^2), D = c_skip x (EDM).
    for sigma in (0.01, 0.5, 2.0):
        c_skip = 0.25 / (sigma ** 2 + 0.25)
        assert torch.allclose(net(x, torch.tensor(sigma)), c_skip * x, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        net.out_gain.fill_(0.7)
    net.eval().requires_grad_(False)
    sigma = torch.full([100], 0.3)
    with torch.no_grad():                                               # edm_sampler runs under no_grad
        d = net(x, sigma)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net.logp(xr, sigma).sum(), xr)
    assert torch.allclose(d, x + 0.09 * g, atol=1e-5)
    out = edm_sampler(net, torch.randn(50, 2), num_steps=4, sigma_max=5)
    assert out.shape == (50, 2) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="must both be >= 1"):
        ToyNet(ToyNetConfig(hidden_dim=0))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A small trained run with snapshots (dim 32, 256 iterations of 256 points)."""
    out = tmp_path_factory.mktemp("toy") / "run"
    cfg = ToyTrainConfig(hidden_dim=32, iters=256, batch_size=256, sigma_rels=(0.010, 0.050, 0.100), snapshot_iters=32)
    run = train_toy(cfg, outdir=out, progress=False)  # config.threads = 1 while training
    return run, out


def test_training_learns_the_tree(toy_run):
    run, out = toy_run
    assert len(list_toy_snapshots(out)) == 3 * 8
    info = json.loads((out / "training.json").read_text())
    assert info["config"]["iters"] == 256 and info["final_loss"] == pytest.approx(run.final_loss)
    untrained = toy_score(sample_toy(ToyNet(ToyNetConfig(hidden_dim=32)).eval(), 1024, seed=0))
    trained = toy_score(sample_toy(run.ema, 1024, seed=0))
    assert untrained["in_fraction"] < 0.5 < trained["in_fraction"]
    assert trained["mean_logp"] > untrained["mean_logp"] + 2
    # The saved final EMA snapshot is the in-memory one, bit for bit.
    net, meta = load_toy(out / snapshot_name(256 * 256, 0.010))
    assert meta["iter"] == 256 and meta["nimg"] == 256 * 256 and meta["ema_std"] == 0.010
    assert meta["classes"] == "A" and meta["config"]["hidden_dim"] == 32
    x = torch.randn(20, 2)
    assert torch.equal(net(x, torch.tensor(0.1)), run.ema(x, torch.tensor(0.1)))
    with pytest.raises(FileExistsError, match="already holds a toy run"):
        train_toy(run.config, outdir=out, progress=False)


def test_posthoc_ema_matches_tracked_profile(toy_run, tmp_path):
    run, out = toy_run
    # Reconstruct sigma_rel = 0.010 from the 0.050 / 0.100 snapshots only: far outside them, the profile
    # error is about 50 %, refused by default.
    with pytest.raises(ValueError, match="max_profile_error=0.05: .* sigma_rel=0.01 at nimg 65536"):
        posthoc_toy(out, 0.010, in_sigma_rels=(0.050, 0.100))
    rec, meta = posthoc_toy(out, 0.010, in_sigma_rels=(0.050, 0.100), max_profile_error=None)
    assert meta["ema_std"] == 0.010 and meta["posthoc"]["in_sigma_rels"] == [0.05, 0.1]
    assert len(meta["posthoc"]["inputs"]) == 16
    direct = run.emas[0.010]
    w_rec, w_dir, w_far = (torch.cat([p.flatten() for p in n.parameters()]) for n in (rec, direct, run.emas[0.100]))
    assert (w_rec - w_dir).norm() < 0.5 * (w_far - w_dir).norm()
    s_rec, s_dir = (toy_score(sample_toy(n, 1024, seed=5)) for n in (rec, direct))
    assert abs(s_rec["in_fraction"] - s_dir["in_fraction"]) < 0.03
    # Through load_toy_run: a tracked profile loads directly, an untracked one is reconstructed.
    assert load_toy_run(out, sigma_rel=0.05)[1].get("posthoc") is None
    assert "posthoc" in load_toy_run(out, sigma_rel=0.07)[1]
    # The toy's snapshots are edm2 snapshots: `edm2 phema` (edm2.ema.posthoc.reconstruct) writes the same net.
    (path,) = reconstruct(out, tmp_path, [0.07], progress=False)
    from_file, meta = load_toy(path)
    assert meta["nimg"] == 256 * 256 and meta["ema_std"] == 0.07 and meta["config"]["hidden_dim"] == 32
    in_memory = load_toy_run(out, sigma_rel=0.07)[0]
    assert all(torch.equal(a, b) for a, b in zip(from_file.state_dict().values(), in_memory.state_dict().values()))
    # At an earlier iteration: the tracked snapshot of that time, or a reconstruction there.
    assert load_toy_run(out, sigma_rel=0.05, iteration=64)[1]["nimg"] == 64 * 256
    early, meta = load_toy_run(out, sigma_rel=0.07, iteration=64)
    assert meta["iter"] == 64 and len(meta["posthoc"]["inputs"]) == 3 * 2


def test_old_toy_run_is_refused(tmp_path):
    # The toy's former snapshot format (its own metadata key, toy-<iter>-<sigma_rel> names): retrain.
    net = ToyNet(ToyNetConfig(num_layers=1, hidden_dim=4))
    old = tmp_path / "old" / "toy-000004-0.010.safetensors"
    old.parent.mkdir()
    save_file(dict(net.state_dict()), str(old), metadata={"edm2-toy": json.dumps({"format": "edm2-toy"})})
    for source in (old, old.parent):
        with pytest.raises(ValueError, match="written by an older edm2; retrain"):
            load_toy_run(source)


def test_cli(toy_run, tmp_path):
    _, out = toy_run
    assert main(["toy", "score", "--net", str(out), "--num", "128", "--json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["num"] == 128 and 0 <= s["in_fraction"] <= 1 and math.isfinite(s["mean_logp"])
    assert main(["toy", "plot", "--net", str(out), "--gnet", str(out / snapshot_name(64 * 256, 0.010)),
                 "--guidance", "2", "--num", "128", "--trajectories", "8", "--resolution", "40",
                 "--out", str(tmp_path / "p.png"),
                 "--json", str(tmp_path / "p.json")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p["title"] for p in json.loads((tmp_path / "p.json").read_text())] == ["ground truth", "guided, w=2"]
    assert main(["toy", "train", "--dim", "8", "--layers", "1", "--iters", "4", "--batch", "64",
                 "--outdir", str(tmp_path / "tiny")]) == 0
    assert len(list_toy_snapshots(tmp_path / "tiny")) == 3
    for argv, msg in [(["score", "--net", str(out), "--guidance", "2"], "needs --gnet"),
                      (["score", "--net", str(tmp_path / "missing")], "no such toy snapshot"),
                      (["score", "--net", str(tmp_path / "p.png")], "not a toy snapshot"),
                      (["score", "--net", str(out), "--ema-std", "0.5"], "--ema-std [0.5]: every EMA length"),
                      (["train", "--outdir", str(tmp_path / "tiny")], f"--outdir {tmp_path / 'tiny'}: already holds"),
                      (["train", "--dim", "0", "--outdir", str(tmp_path / "x")], "--layers 4 and --dim 0 must both"),
                      (["train", "--ema", "0.5", "--outdir", str(tmp_path / "x")], "--ema [0.5]: every EMA length"),
                      (["train", "--ema", "0.1,0.1", "--outdir", str(tmp_path / "x")], "--ema [0.1, 0.1]: every value"),
                      (["train", "--batch", "10", "--outdir", str(tmp_path / "x")], "must divide --batch 10")]:
        assert_refused(["toy", *argv], watch=[tmp_path, out], match=msg, code=2)
