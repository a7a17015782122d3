"""edm2.sampling: noise levels, Heun accuracy on a Gaussian with its ideal
denoiser, churn, guidance, and per-seed generators (paper App. D.1; docs/design.md#sampler)."""
import math

import pytest
import torch

from edm2.nn import Precond
from edm2.presets import get_preset
from edm2.sampling import (
    SOLVERS,
    SeedRandom,
    check_guidance,
    edm_sampler,
    guided_denoiser,
    guided_step_mask,
    sample_batch,
    sampler_nfe,
    sigma_steps,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# Data ~ N(mu, diag(s^2)) in 4 dims, stored as [N, 4, 1, 1] images.
MU = torch.tensor([1.5, -2.0, 0.3, 0.0]).reshape(1, 4, 1, 1)
S = torch.tensor([0.5, 1.0, 2.0, 0.1]).reshape(1, 4, 1, 1)
N = 20000


def ideal_denoiser(x, sigma, labels=None):
    """E[y | y + sigma n = x] for y ~ N(mu, s^2): mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def exact_ode(noise, t0):
    """Exact probability-flow ODE solution dx/dsigma = (x - D(x; sigma)) / sigma from
    x(t0) = t0 * noise to sigma = 0: x - mu scales like sqrt(s^2 + sigma^2)."""
    mu, s, t0 = MU.double(), S.double(), float(t0)
    return mu + (t0 * noise.double() - mu) * s / torch.sqrt(s ** 2 + t0 ** 2)


def gaussian_noise(seed=0):
    return torch.randn([N, 4, 1, 1], generator=torch.Generator().manual_seed(seed))


def test_sigma_steps_follow_edm_schedule():
    t = sigma_steps(32, 0.002, 80, 7)
    assert t.dtype == torch.float32 and t.shape == (33,)
    assert t[-1] == 0 and torch.all(t[:-1] > t[1:])
    assert t[0].item() == pytest.approx(80, rel=1e-6) and t[-2].item() == pytest.approx(0.002, rel=1e-5)
    # t_i^(1/rho) is linear in i (EDM Eq. 5).
    r = t[:-1].double() ** (1 / 7)
    assert torch.allclose(r[1:] - r[:-1], (r[-1] - r[0]) / 31 * torch.ones(31, dtype=torch.float64), rtol=1e-4)
    with pytest.raises(ValueError, match="num_steps"):
        sigma_steps(0)


def test_heun_is_second_order_against_exact_ode():
    noise = gaussian_noise()[:2000]
    t0 = sigma_steps()[0]
    exact = exact_ode(noise, t0)
    err = {n: (edm_sampler(ideal_denoiser, noise, num_steps=n).double() - exact).abs().max().item()
           for n in (16, 32, 64)}
    # Halving the step size divides the error of a 2nd-order method by ~4 (Euler: ~2).
    assert 3.0 < err[16] / err[32] < 6.0
    assert 3.0 < err[32] / err[64] < 6.0


def test_gaussian_mean_and_std_recovered():
    noise = gaussian_noise()
    t0 = float(sigma_steps()[0])
    x = edm_sampler(ideal_denoiser, noise, num_steps=32).double()
    exact = exact_ode(noise, t0)
    mu, s = MU.flatten().double(), S.flatten().double()
    mean, std = x.mean([0, 2, 3]), x.std([0, 2, 3])
    # Three error sources: (1) sampling error, 4 standard errors (s/sqrt(N) for the
    # mean, s/sqrt(2N) for the std); (2) the closed-form bias of starting at t0*noise
    # rather than at the data's marginal at t0; (3) the 32-step Heun discretisation,
    # measured against the exact ODE solution from the same noise.
    shrink = s / torch.sqrt(s ** 2 + t0 ** 2)
    bias_mean, bias_std = (mu * shrink).abs(), (s - t0 * shrink).abs()
    disc_mean = (mean - exact.mean([0, 2, 3])).abs()
    disc_std = (std - exact.std([0, 2, 3])).abs()
    assert torch.all(disc_std < 0.03 * s)  # Heun at 32 steps is within 3% here
    assert torch.all((mean - mu).abs() < 4 * s / math.sqrt(N) + bias_mean + disc_mean)
    assert torch.all((std - s).abs() < 4 * s / math.sqrt(2 * N) + bias_std + disc_std)


def test_churn_converges_and_defaults_to_deterministic():
    noise = gaussian_noise(1)
    det = edm_sampler(ideal_denoiser, noise, num_steps=16)
    # S_churn > 0 but S_min above every noise level: no churn, no noise drawn.
    calls = []
    no_churn = edm_sampler(ideal_denoiser, noise, num_steps=16, S_churn=10, S_min=100,
                           randn_like=lambda x: calls.append(1) or torch.randn_like(x))
    assert torch.equal(det, no_churn) and not calls

    def rel_std_err(steps):
        g = torch.Generator().manual_seed(2)
        x = edm_sampler(ideal_denoiser, noise, num_steps=steps, S_churn=steps / 2, S_min=0.05, S_max=50,
                        randn_like=lambda t: torch.randn(t.shape, generator=g))
        return (x.std([0, 2, 3]) / S.flatten() - 1).abs().max().item()
    # The stochastic sampler has a larger discretisation error that shrinks with the steps;
    # with 128 steps it is within 3% (4 standard errors of the std alone are 2%).
    e32, e128 = rel_std_err(32), rel_std_err(128)
    assert e128 < 0.5 * e32 and e128 < 0.03


def tiny_net(label_dim=3, seed=0):
    torch.manual_seed(seed)
    net = Precond(**get_preset("tiny").net_kwargs(label_dim))
    with torch.no_grad():  # non-zero gains, or the fresh net is just c_skip * x
        net.unet.out_gain.fill_(1.0)
        for name, p in net.named_parameters():
            if name.endswith("emb_gain"):
                p.fill_(0.5)
    return net.eval().requires_grad_(False)


class Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args):
        self.calls += 1
        return self.net(*args)


def test_guidance_weight_one_and_self_guidance():
    net, other = tiny_net(seed=0), Counting(tiny_net(seed=1))
    noise = torch.randn([3, 1, 16, 16], generator=torch.Generator().manual_seed(0))
    labels = torch.eye(3)
    plain = edm_sampler(net, noise, labels, num_steps=4)
    # w = 1: the guide is never evaluated and the result is the unguided one.
    assert torch.equal(edm_sampler(net, noise, labels, gnet=other, guidance=1, num_steps=4), plain)
    assert other.calls == 0
    # Guiding a net by itself changes nothing, whatever w.
    for w in (0.0, 2.5, 7.0):
        assert torch.allclose(edm_sampler(net, noise, labels, gnet=net, guidance=w, num_steps=4), plain, atol=1e-6)
    # A different guide with w != 1 does change the result, by D_g + w (D - D_g).
    guided = edm_sampler(net, noise, labels, gnet=other, guidance=2.0, num_steps=4)
    assert other.calls == 7 and (guided - plain).abs().max() > 1e-3
    x, t = noise * 3, torch.tensor(3.0)
    d, dg = net(x, t, labels), other(x, t, labels)
    assert torch.allclose(guided_denoiser(net, other, 2.0)(x, t, labels), dg + 2.0 * (d - dg), atol=1e-5)
    with pytest.raises(ValueError, match="gnet"):
        edm_sampler(net, noise, labels, guidance=2.0)


def test_seed_random_is_per_seed():
    seeds = [5, 7, 2 ** 32 + 5]
    rnd = SeedRandom(seeds)
    noise = rnd.randn([3, 2, 4, 4])
    # Each slice is exactly what the seed's own generator draws (seed taken mod 2^32).
    assert torch.equal(noise[0], torch.randn([2, 4, 4], generator=torch.Generator().manual_seed(5)))
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    # Independent of the other seeds in the batch, including later draws.
    alone = SeedRandom([7])
    assert torch.equal(alone.randn([1, 2, 4, 4])[0], noise[1])
    assert torch.equal(alone.randint(10, [1])[0], rnd.randint(10, [3])[1])
    assert torch.equal(alone.randn_like(noise[:1])[0], rnd.randn_like(noise)[1])
    with pytest.raises(ValueError, match="number of seeds"):
        rnd.randn([2, 4])


def test_check_guidance_is_the_one_rule():
    check_guidance(1.0)                      # plain sampling needs no guide
    check_guidance(2.0, gnet="guide.safetensors")
    for gnet in (None, ""):
        with pytest.raises(ValueError, match="guidance=2: needs `gnet`"):
            check_guidance(2.0, gnet)
    with pytest.raises(ValueError, match="finite"):
        check_guidance(float("nan"), gnet="guide.safetensors")
    net = lambda x, t, labels: x  # noqa: E731
    with pytest.raises(ValueError, match="guidance=1.5: needs `gnet`"):
        guided_denoiser(net, None, 1.5)


# ---------------------------------------------------------------------------
# Guidance interval (Kynkäänniemi et al. 2024), solvers, callback, NFE.
# ---------------------------------------------------------------------------

def heun_before_solvers(net, noise, labels, gnet, guidance, num_steps, S_churn, randn_like):
    """The Heun sampler as it was before solvers and the guidance interval were added
    (EDM Alg. 2), for the bit-for-bit check of the defaults."""
    denoise = guided_denoiser(net, gnet, guidance)
    t_steps = sigma_steps(num_steps)
    gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_churn > 0 else 0.0
    x_next = noise.to(torch.float32) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        if gamma > 0:
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * randn_like(x_cur)
        else:
            t_hat, x_hat = t_cur, x_cur
        d_cur = (x_hat - denoise(x_hat, t_hat, labels)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next, labels)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def test_defaults_reproduce_the_heun_sampler_bit_for_bit():
    net, guide = tiny_net(seed=0), tiny_net(seed=1)
    noise = torch.randn([2, 1, 16, 16], generator=torch.Generator().manual_seed(3))
    labels = torch.eye(3)[:2]
    for w, churn in ((1.0, 0.0), (2.0, 0.0), (2.0, 3.0)):
        rnd_a, rnd_b = SeedRandom([1, 2]), SeedRandom([1, 2])
        old = heun_before_solvers(net, noise, labels, guide, w, 5, churn, rnd_a.randn_like)
        new = edm_sampler(net, noise, labels, gnet=guide, guidance=w, num_steps=5, S_churn=churn,
                          randn_like=rnd_b.randn_like)
        assert torch.equal(old, new)


def test_published_interval_selects_steps_17_to_22():
    # The published form [17, 22] (inclusive step indices) at 32 steps, rho 7,
    # sigma 0.002-80 is the noise-level interval (0.28, 1.61]; FD_DINOv2's [13, 19] is (0.6, 5.0].
    t = sigma_steps(32, 0.002, 80, 7)
    assert [i for i, m in enumerate(guided_step_mask(t, (0.28, 1.61))) if m] == list(range(17, 23))
    assert [i for i, m in enumerate(guided_step_mask(t, "0.6,5.0")) if m] == list(range(13, 20))


def test_guidance_interval_full_empty_and_guide_calls():
    net, guide = tiny_net(seed=0), Counting(tiny_net(seed=1))
    noise = torch.randn([2, 1, 16, 16], generator=torch.Generator().manual_seed(0))
    labels = torch.eye(3)[:2]
    for solver in SOLVERS:
        kw = dict(num_steps=6, solver=solver)
        plain = edm_sampler(net, noise, labels, **kw)
        guided = edm_sampler(net, noise, labels, gnet=guide, guidance=2.0, **kw)
        # (0, inf) contains every step: plain guidance, bit for bit.
        full = edm_sampler(net, noise, labels, gnet=guide, guidance=2.0, guidance_interval=(0, float("inf")), **kw)
        assert torch.equal(full, guided) and not torch.equal(guided, plain)
        # An interval with no step in it: unguided sampling, and the guide is never called.
        for empty in ((100.0, 200.0), (1.0, 1.0)):
            guide.calls = 0
            out = edm_sampler(net, noise, labels, gnet=guide, guidance=2.0, guidance_interval=empty, **kw)
            assert torch.equal(out, plain) and guide.calls == 0
        # Only the steps inside the interval call the guide, in all their evaluations.
        t = sigma_steps(6)
        interval = (float(t[3]) - 1e-3, float(t[1]))  # steps 1, 2, 3
        guide.calls = 0
        edm_sampler(net, noise, labels, gnet=guide, guidance=2.0, guidance_interval=interval, **kw)
        expected = sampler_nfe(solver, 6, guide=True, guidance_interval=interval) - sampler_nfe(solver, 6)
        assert guide.calls == expected == (6 if solver == "heun" else 3)


def test_sampler_nfe_counts():
    assert [sampler_nfe(s, 32) for s in SOLVERS] == [63, 32, 32]
    assert sampler_nfe("heun", 1) == 1
    assert sampler_nfe("heun", 32, guide=True) == 126 and sampler_nfe("euler", 8, guide=True) == 16
    assert sampler_nfe("heun", 32, guide=True, guidance_interval=(0.28, 1.61)) == 63 + 12
    with pytest.raises(ValueError, match="solver='rk4'"):
        sampler_nfe("rk4", 8)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2), ("dpm++2m", 2)])
def test_solver_order_of_convergence_on_gaussian(solver, order):
    # Data N(0, s^2): D(x, sigma) = x s^2 / (s^2 + sigma^2), and the probability-flow ODE's
    # exact solution is x(sigma) = x_T sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2).
    s = 0.5
    noise = torch.randn([500, 1, 1, 1], generator=torch.Generator().manual_seed(0))
    err = []
    for n in (16, 32, 64):
        t0 = float(sigma_steps(n)[0])
        exact = noise.double() * t0 * s / math.sqrt(s ** 2 + t0 ** 2)
        x = edm_sampler(lambda x, t, labels: x * s ** 2 / (s ** 2 + t ** 2), noise, num_steps=n, solver=solver)
        err.append((x.double() - exact).abs().max().item())
    slopes = [math.log2(a / b) for a, b in zip(err[:-1], err[1:])]
    assert all(abs(k - order) < 0.35 for k in slopes), slopes


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_are_per_seed_with_guidance_and_interval(solver):
    net, guide = tiny_net(seed=0), tiny_net(label_dim=0, seed=1)
    guide.img_channels = net.img_channels
    churn = {} if solver == "dpm++2m" else dict(S_churn=2.0)
    kw = dict(gnet=guide, guidance=1.5, num_steps=4, solver=solver, guidance_interval=(0.5, 20.0), **churn)
    batch, _, classes = sample_batch(net, None, SeedRandom([4, 9, 11]), **kw)
    alone, _, one_class = sample_batch(net, None, SeedRandom([9]), **kw)
    assert torch.equal(classes[1:2], one_class)
    assert torch.allclose(batch[1:2], alone, rtol=1e-4, atol=1e-4)  # batch size changes float rounding only
    uncond = tiny_net(label_dim=0, seed=2)
    out = sample_batch(uncond, None, SeedRandom([1, 2]), gnet=guide, guidance=2.0, num_steps=3, solver=solver)[0]
    assert out.shape == (2, uncond.img_channels, 16, 16) and torch.isfinite(out).all()


def test_solver_refusals_and_callback():
    noise = torch.randn([2, 1, 2, 2])
    D = lambda x, t, labels: 0.5 * x  # noqa: E731
    with pytest.raises(ValueError, match="S_churn=1: solver='dpm\\+\\+2m'"):
        edm_sampler(D, noise, solver="dpm++2m", S_churn=1)
    with pytest.raises(ValueError, match="solver='ddim': unknown"):
        edm_sampler(D, noise, solver="ddim")
    for bad in ((2.0, 1.0), (-1, 2), "0.3", (0.1, float("nan"))):
        with pytest.raises(ValueError, match="guidance_interval="):
            edm_sampler(D, noise, guidance_interval=bad)
    for solver in SOLVERS:
        seen = []
        x = edm_sampler(D, noise, num_steps=5, solver=solver, callback=seen.append)
        assert [c["i"] for c in seen] == list(range(5)) and torch.equal(seen[-1]["x"], x)
        assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert float(seen[0]["sigma"]) == pytest.approx(80)


def test_sampler_nfe_benchmark_arguments_and_recommendation():
    """benchmarks/sampler_nfe.py: its options, its points (Heun-32 always measured) and its pick."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parents[1] / "benchmarks" / "sampler_nfe.py"
    spec = importlib.util.spec_from_file_location("sampler_nfe_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--net", "n", "--gnet", "g", "--guidance", "2", "--guidance-interval", "0.28,1.61",
                             "--ref", "r", "--solvers", "euler,dpm++2m", "--steps", "8,16"])
    assert args.guidance_interval == (0.28, 1.61)
    pts = bench.points(args)
    assert pts[0] == ("guided", "heun", 32) and ("interval", "dpm++2m", 16) in pts and len(pts) == 10
    per_solver = bench.points(bench.parse_args(["--net", "n", "--ref", "r", "--steps", "heun:4,32/dpm++2m:6,12"]))
    assert per_solver == [("unguided", s, n) for s, n in (("heun", 4), ("heun", 32), ("dpm++2m", 6), ("dpm++2m", 12))]
    with pytest.raises(SystemExit):
        bench.parse_args(["--net", "n", "--ref", "r", "--steps", "heun:8/dpm++2m"])  # a solver without steps
    with pytest.raises(SystemExit):
        bench.parse_args(["--net", "n", "--ref", "r", "--solvers", "rk4"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--net", "n", "--ref", "r", "--guidance-interval", "0.28,1.61"])  # no guidance
    rows = [dict(variant="unguided", solver=s, steps=n, nfe=sampler_nfe(s, n), guide_nfe=0, fd_classifier=fd,
                 consistency=0.5, s_per_img=0.01 * sampler_nfe(s, n))
            for s, n, fd in (("heun", 32, 10.0), ("euler", 8, 12.0), ("dpm++2m", 8, 10.4), ("dpm++2m", 16, 10.0))]
    (line,) = bench.recommend(rows)
    assert line.startswith("unguided: dpm++2m 8 steps, NFE 8") and "7.88x faster" in line
