"""Post-hoc EMA math (edm2.ema.profiles; paper Sec. 3 and Appendix C)."""
import numpy as np
import pytest
from scipy.integrate import quad

from edm2.ema.profiles import (
    MAX_SIGMA_REL,
    exp_to_std,
    power_function_beta,
    profile_density,
    profile_fit_error,
    profile_inner_product,
    solve_posthoc_coefficients,
    std_to_exp,
)


def test_std_to_exp_check_values_and_round_trip():
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.005)
    assert std_to_exp(0.10) == pytest.approx(6.94, abs=0.005)
    s = np.linspace(1e-3, MAX_SIGMA_REL - 1e-6, 5001)
    g = std_to_exp(s)
    assert g.shape == s.shape
    np.testing.assert_allclose(exp_to_std(g), s, rtol=0, atol=1e-10)
    # Independent check: the largest real root of the cubic of Eq. 126, found by numpy.
    for v in (0.002, 0.05, 0.1, 0.25):
        roots = np.roots([1, 7, 16 - v ** -2, 12 - v ** -2])
        assert std_to_exp(v) == pytest.approx(roots[abs(roots.imag) < 1e-9].real.max(), rel=1e-12)
    assert std_to_exp(np.array([[0.05, 0.1]])).shape == (1, 2)


@pytest.mark.parametrize("bad", [0.0, -0.05, MAX_SIGMA_REL, 0.29, float("nan")])
def test_std_out_of_range_is_an_error(bad):
    with pytest.raises(ValueError, match="0.2887"):
        std_to_exp(bad)
    with pytest.raises(ValueError, match="0.2887"):
        solve_posthoc_coefficients([100, 200], [0.05, 0.1], 200, [0.07, bad])


def test_beta_telescopes_to_the_power_function_profile():
    """The trainer's update with beta = (1 - dt/t)^(g+1) gives step k of n the weight
    (k/n)^(g+1) - ((k-1)/n)^(g+1), i.e. exactly the integral of p over that step."""
    n, dt, sigma_rel = 50, 8, 0.1
    t = dt * np.arange(1, n + 1)
    beta = power_function_beta(sigma_rel, t, dt)
    assert beta[0] == 0.0 and np.all(np.diff(beta) > 0)
    w = np.array([(1 - beta[k]) * np.prod(beta[k + 1:]) for k in range(n)])
    g = std_to_exp(sigma_rel)
    np.testing.assert_allclose(w, (t / t[-1]) ** (g + 1) - ((t - dt) / t[-1]) ** (g + 1), rtol=1e-10, atol=1e-15)
    # Vectorised over profiles and times at once.
    both = power_function_beta(np.array([[0.05], [0.1]]), t[None, :], dt)
    np.testing.assert_allclose(both[1], beta)


def test_inner_product_and_fit_error_match_numerical_integrals():
    cases = [(300.0, 0.05, 1000.0, 0.10), (1000.0, 0.12, 400.0, 0.03), (500.0, 0.07, 500.0, 0.07)]
    for t_a, s_a, t_b, s_b in cases:
        f = lambda tau: profile_density(tau, t_a, s_a) * profile_density(tau, t_b, s_b)
        numeric = quad(f, 0, min(t_a, t_b), limit=200)[0]
        assert profile_inner_product(t_a, s_a, t_b, s_b) == pytest.approx(numeric, rel=1e-8)
        assert profile_inner_product(t_b, s_b, t_a, s_a) == pytest.approx(numeric, rel=1e-8)
    assert quad(lambda tau: profile_density(tau, 700.0, 0.09), 0, 700)[0] == pytest.approx(1, rel=1e-10)

    in_t, in_sigma_rel = np.repeat([200.0, 400.0, 600.0], 2), np.tile([0.05, 0.10], 3)
    X = solve_posthoc_coefficients(in_t, in_sigma_rel, 600.0, [0.08])
    mix = lambda tau: sum(X[i, 0] * profile_density(tau, in_t[i], in_sigma_rel[i]) for i in range(6))
    diff2 = quad(lambda tau: (mix(tau) - profile_density(tau, 600.0, 0.08)) ** 2, 0, 600, points=[200, 400],
                 limit=400)[0]
    norm2 = profile_inner_product(600.0, 0.08, 600.0, 0.08)
    assert profile_fit_error(in_t, in_sigma_rel, X, 600.0, [0.08])[0] == pytest.approx(np.sqrt(diff2 / norm2), rel=1e-4)


def test_reconstructing_a_stored_profile_picks_that_snapshot():
    in_t = np.repeat(np.arange(1, 17) * 4096.0, 2)
    in_sigma_rel = np.tile([0.05, 0.10], 16)
    for k, out_t, out_sigma_rel in [(31, in_t[-1], 0.10), (30, in_t[-1], 0.05), (13, in_t[13], 0.10)]:
        use = in_t <= out_t
        X = solve_posthoc_coefficients(in_t[use], in_sigma_rel[use], out_t, out_sigma_rel)
        assert X.shape == (use.sum(), 1)
        assert X.sum() == pytest.approx(1, abs=1e-12)
        expected = np.eye(use.sum())[:, k]
        np.testing.assert_allclose(X[:, 0], expected, atol=1e-6)
        assert profile_fit_error(in_t[use], in_sigma_rel[use], X, out_t, out_sigma_rel)[0] < 1e-6


def test_random_walk_reconstruction_matches_direct_tracking():
    """Track sigma_rel 0.05 and 0.10 exactly as the trainer does (power_function_beta with
    image counts), snapshot both every 128 steps (32 times, 64 snapshots), reconstruct
    0.07 and 0.15 and compare with the same profiles tracked directly.

    Why the bound holds: beta telescopes (test above), so each tracked EMA is exactly
    the integral of its profile p(tau) against the piecewise-constant trajectory
    theta(tau). The reconstruction realises p_hat = sum_i X_ij p_i with the same
    integral 1, so for every coordinate and any constant c
        |theta_hat - theta| = |int (p_hat - p)(theta(tau) - c)| <= ||p_hat - p||_2 ||theta - c||_2
    (Cauchy-Schwarz); ||p_hat - p||_2 is profile_fit_error * ||p||_2, known in closed form.
    The paper reports the method as near-exact with this many snapshots: we also
    require the error to be < 0.1% of how far the EMA moved the weights (|theta - theta_raw|).
    """
    rng = np.random.default_rng(0)
    batch, steps, every, dim = 32, 4096, 128, 48
    sigma_rels = np.array([0.05, 0.10, 0.07, 0.15])  # stored, stored, wanted, wanted
    t = batch * np.arange(1, steps + 1)
    betas = power_function_beta(sigma_rels[:, None], t[None, :], batch)  # [4, steps]
    traj = np.cumsum(rng.standard_normal((steps, dim)), axis=0)    # theta after each step
    ema = np.zeros((4, dim))
    snap_t, snap_sigma_rel, snap_theta = [], [], []
    for k in range(steps):
        ema = betas[:, k, None] * ema + (1 - betas[:, k, None]) * traj[k]
        if (k + 1) % every == 0:
            snap_t += [t[k]] * 2
            snap_sigma_rel += [0.05, 0.10]
            snap_theta += [ema[0].copy(), ema[1].copy()]
    assert len(snap_t) == 64
    X = solve_posthoc_coefficients(snap_t, snap_sigma_rel, t[-1], sigma_rels[2:])
    rec = X.T @ np.array(snap_theta)
    fit = profile_fit_error(snap_t, snap_sigma_rel, X, t[-1], sigma_rels[2:])
    c = traj.mean(axis=0)
    traj_l2 = np.sqrt(batch * ((traj - c) ** 2).sum(axis=0))          # ||theta(.) - c||_2 per coordinate
    for j in range(2):
        err = np.abs(rec[j] - ema[2 + j])
        p_norm = np.sqrt(profile_inner_product(t[-1], sigma_rels[2 + j], t[-1], sigma_rels[2 + j]))
        assert np.all(err <= fit[j] * p_norm * traj_l2 * (1 + 1e-6) + 1e-9)
        rel = np.linalg.norm(rec[j] - ema[2 + j]) / np.linalg.norm(ema[2 + j] - traj[-1])
        print(f"sigma_rel {sigma_rels[2 + j]}: relative error {rel:.2e}, profile L2 error {fit[j]:.2e}")
        assert rel < 1e-3
        # Negative control: the nearest stored profile is far off by the same measure.
        naive = np.linalg.norm(ema[j] - ema[2 + j]) / np.linalg.norm(ema[2 + j] - traj[-1])
        assert naive > 0.1


def test_public_names():
    # edm2.phema keeps the stable names of docs/design.md importable; edm2.ema exports the package's API.
    import edm2.ema
    import edm2.ema.profiles
    import edm2.phema

    stable = ["exp_to_std", "std_to_exp", "power_function_beta", "profile_inner_product", "solve_posthoc_coefficients"]
    for name in stable:
        assert getattr(edm2.phema, name) is getattr(edm2.ema.profiles, name) is getattr(edm2.ema, name)
    for name in edm2.ema.__all__:
        assert getattr(edm2.ema, name) is not None
    assert edm2.ema.reconstruct.__module__ == "edm2.ema.posthoc"
    assert edm2.ema.reconstruct_state_dict.__module__ == "edm2.ema.trackers"
