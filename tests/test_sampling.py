"""edm2.sampling: noise levels, Heun accuracy on a Gaussian with its ideal
denoiser, churn, guidance, and per-seed generators (paper App. D.1; docs/design.md#sampler)."""
import math

import pytest
import torch

from edm2.nn import Precond
from edm2.presets import get_preset
from edm2.sampling import SeedRandom, check_guidance, edm_sampler, guided_denoiser, sigma_steps

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
