"""Power-function EMA tracking during training (paper Eq. 2 / Eq. 127)."""
import numpy as np
import pytest
import torch
from scipy.integrate import quad

from edm2.ema.profiles import std_to_exp
from edm2.ema.trackers import PowerFunctionEMA
from edm2.utils.errors import EDM2Error


class _Toy(torch.nn.Module):
    def __init__(self, n=5):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.register_buffer("b", torch.zeros(n))
        self.register_buffer("count", torch.zeros([], dtype=torch.int64))


def _trajectory(k, n=5):
    """A deterministic synthetic parameter trajectory theta_k (float32, like the network)."""
    i = np.arange(n)
    return np.float32(np.sin(0.3 * k + i) + 0.05 * k)


def _power_average(times, thetas, gamma):
    """Direct evaluation of the power-function average over [0, t_K] of the
    piecewise-constant trajectory theta(tau) = theta_k on (t_{k-1}, t_k]:
    integral of theta(tau) * (gamma+1) tau^gamma / t_K^(gamma+1), by quadrature."""
    t_end = times[-1]
    weights = []
    for t0, t1 in zip([0] + times[:-1], times):
        w, _ = quad(lambda tau: (gamma + 1) * (tau / t_end) ** gamma / t_end, t0, t1, epsabs=1e-14, epsrel=1e-12)
        weights.append(w)
    weights = np.asarray(weights)
    assert abs(weights.sum() - 1) < 1e-9  # the profile integrates to one
    return (weights[:, None] * np.asarray(thetas, np.float64)).sum(0)


@pytest.mark.parametrize("sigma_rel", [0.050, 0.100])
def test_tracked_profile_is_the_power_function_average_of_the_image_count(sigma_rel):
    # Uneven batches: beta must come from the image count t, not from the step count.
    batches = [3, 10, 1, 50, 7, 7, 100, 2, 33, 64, 5, 256, 9, 1, 40]
    net = _Toy()
    ema = PowerFunctionEMA(net, sigma_rels=[sigma_rel])
    times, thetas, t = [], [], 0
    for k, dt in enumerate(batches):
        theta = _trajectory(k)
        with torch.no_grad():
            net.w.copy_(torch.from_numpy(theta))
        t += dt
        ema.update(net, t, dt)
        times.append(t)
        thetas.append(theta)
    got = ema.nets[sigma_rel].w.double().numpy()
    want = _power_average(times, thetas, std_to_exp(sigma_rel))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)

    # The same updates with beta from the step count give a clearly different average,
    # so this comparison does detect a step-count implementation.
    steps = list(range(1, len(batches) + 1))
    wrong = _power_average(steps, thetas, std_to_exp(sigma_rel))
    assert np.abs(wrong - want).max() > 1e-2


def test_first_update_copies_float_buffers_are_averaged_integer_buffers_copied():
    net = _Toy()
    ema = PowerFunctionEMA(net, sigma_rels=[0.05, 0.10])
    with torch.no_grad():
        net.w.copy_(torch.tensor([1.0, -2.0, 3.5, 0.25, 7.0]))
        net.b.fill_(3.0)
        net.count.fill_(1)
    ema.update(net, 8, 8)  # t == dt: beta = 0
    for m in ema.nets.values():
        assert torch.equal(m.w, net.w.detach()) and torch.equal(m.b, net.b) and int(m.count) == 1
        assert not m.w.requires_grad and not m.training
    with torch.no_grad():
        net.w.zero_()
        net.b.fill_(-1.0)
        net.count.fill_(2)
    ema.update(net, 16, 8)
    gamma = std_to_exp(0.10)
    beta = (1 - 8 / 16) ** (gamma + 1)
    np.testing.assert_allclose(ema.nets[0.10].w.numpy(), beta * np.array([1.0, -2.0, 3.5, 0.25, 7.0]),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(ema.nets[0.10].b.numpy(), np.full(5, beta * 3.0 - (1 - beta)), rtol=0, atol=1e-6)
    assert ema.nets[0.10].count.dtype == torch.int64 and int(ema.nets[0.10].count) == 2  # copied, not averaged
    # A float buffer that never changes stays bit-identical (lerp of equal values).
    with torch.no_grad():
        net.b.fill_(0.1)
    for t in (24, 32, 40):
        ema.update(net, t)
    other = PowerFunctionEMA(net, sigma_rels=[0.05])
    for t in (8, 16, 24):
        other.update(net, t)
    assert torch.equal(other.nets[0.05].b, net.b)
    # batch_size, when given, must agree with the images since the previous update.
    with pytest.raises(ValueError, match="every k"):
        ema.update(net, 48, 16)
    with pytest.raises(ValueError, match="must exceed"):
        ema.update(net, 40)


def test_state_dict_round_trip_and_profile_mismatch():
    net = _Toy()
    a = PowerFunctionEMA(net, sigma_rels=[0.05, 0.10])
    with torch.no_grad():
        net.w.uniform_()
    a.update(net, 4, 4)
    b = PowerFunctionEMA(_Toy(), sigma_rels=[0.05, 0.10])
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.nets[0.05].w, a.nets[0.05].w)
    with pytest.raises(EDM2Error, match=r"'0.100000'\] but the run tracks \['0.050000'\]; resume with the same"):
        PowerFunctionEMA(_Toy(), sigma_rels=[0.05]).load_state_dict(a.state_dict())
    with pytest.raises(EDM2Error, match=r"sigma_rels=\[0.5\]: every EMA length"):
        PowerFunctionEMA(_Toy(), sigma_rels=[0.5])
    with pytest.raises(EDM2Error, match=r"sigma_rels=0.1,0.1: every value must be different"):
        PowerFunctionEMA(_Toy(), sigma_rels=[0.1, 0.1])
    with pytest.raises(EDM2Error, match="`sigma_rels`: track at least one"):
        PowerFunctionEMA(_Toy(), sigma_rels=[])
