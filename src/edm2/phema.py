"""Power-function EMA and its post-hoc reconstruction (paper Sec. 3.1 and
Appendix C; SPEC §7). All functions take numpy-compatible scalars or arrays
and compute in float64."""
from __future__ import annotations

import numpy as np

__all__ = ["exp_to_std", "std_to_exp", "power_function_beta", "profile_inner_product",
           "solve_posthoc_coefficients", "MAX_STD"]

MAX_STD = float(np.sqrt(1 / 12))  # sigma_rel of gamma = 0, the flat profile (upper bound)


def exp_to_std(gamma):
    """Relative standard deviation of the power-function profile (Eq. 123)."""
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_exp(sigma_rel):
    """Exponent gamma for a relative width: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (Eq. 125)."""
    s = np.asarray(sigma_rel, dtype=np.float64)
    if np.any(s <= 0) or np.any(s >= MAX_STD):
        raise ValueError(f"sigma_rel={s.tolist()}: every value must lie in (0, {MAX_STD:.4f}) (the flat profile)")
    flat = s.ravel()
    out = np.empty_like(flat)
    for i, v in enumerate(flat):
        roots = np.roots([1, 7, 16 - v ** -2, 12 - v ** -2])
        real = roots[np.abs(roots.imag) < 1e-6 * np.maximum(1, np.abs(roots))].real
        out[i] = real.max()
        # One Newton step on the relation itself polishes the cubic's root.
        g = out[i]
        f = g ** 3 + 7 * g ** 2 + (16 - v ** -2) * g + (12 - v ** -2)
        out[i] = g - f / (3 * g ** 2 + 14 * g + (16 - v ** -2))
    return out.reshape(s.shape) if s.ndim else float(out[0])


def power_function_beta(sigma_rel, t_next, t_delta):
    """EMA decay for the update that brings the image count to t_next with a
    batch of t_delta: beta = (1 - t_delta / t_next)^(gamma + 1) (Eq. 124).
    Counting images, not steps; the first update (t_next == t_delta) gives 0."""
    gamma = std_to_exp(sigma_rel)
    return (1 - np.asarray(t_delta, np.float64) / np.asarray(t_next, np.float64)) ** (np.asarray(gamma) + 1)


def profile_inner_product(t_a, sigma_rel_a, t_b, sigma_rel_b):
    """<p_a, p_b> of two power-function profiles (Eq. 127), broadcasting."""
    t_a = np.asarray(t_a, np.float64)
    t_b = np.asarray(t_b, np.float64)
    g_a = np.asarray(std_to_exp(sigma_rel_a), np.float64)
    g_b = np.asarray(std_to_exp(sigma_rel_b), np.float64)
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, g_b, -g_a)
    t_max = np.maximum(t_a, t_b)
    num = (g_a + 1) * (g_b + 1) * t_ratio ** t_exp
    den = (g_a + g_b + 1) * t_max
    return num / den


def solve_posthoc_coefficients(in_t, in_std, out_t, out_std):
    """Least-squares combination of stored profiles that best matches each
    wanted profile (Eq. 128-130). Returns X of shape [len(in), len(out)],
    every column summing to 1, so that theta_out[j] = sum_i X[i, j] theta_in[i]."""
    in_t = np.asarray(in_t, np.float64).ravel()
    in_std = np.broadcast_to(np.asarray(in_std, np.float64), in_t.shape).ravel()
    out_t = np.atleast_1d(np.asarray(out_t, np.float64)).ravel()
    out_std = np.atleast_1d(np.asarray(out_std, np.float64)).ravel()
    out_t, out_std = np.broadcast_arrays(out_t, out_std)
    A = profile_inner_product(in_t[:, None], in_std[:, None], in_t[None, :], in_std[None, :])
    B = profile_inner_product(in_t[:, None], in_std[:, None], out_t[None, :], out_std[None, :])
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0, keepdims=True)
