"""Power-function EMA and the math of its post-hoc reconstruction (paper
Sec. 3.1-3.2 and Appendix C). Everything here is numpy float64 and
vectorised over arrays; the file streaming lives in `edm2.ema.posthoc`.

A profile with exponent gamma, ending at time t (counted in training images),
weights the past parameters theta(tau) with the density
    p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t,
and is named by its relative width sigma_rel (the "EMA length").
"""
from __future__ import annotations

import numpy as np

from ..io.snapshot import snapshot_name
from ..utils.errors import EDM2Error

MAX_SIGMA_REL = float(np.sqrt(1 / 12))  # sigma_rel of gamma = 0, the flat profile (upper bound, 0.2887)


def check_sigma_rel(sigma_rel, name: str = "sigma_rel", distinct: bool = False) -> np.ndarray:
    """Return sigma_rel as a float64 array, or raise `EDM2Error` (a ValueError) unless
    every value lies in the open interval (0, MAX_SIGMA_REL); `name` is the argument
    named in the message.

    distinct=True (a list of EMA lengths to track or to write, one file each): also
    refuse values whose snapshot file names (`edm2.io.snapshot.snapshot_name`, three
    decimals) would be the same, such as 0.05 and 0.0504; one profile would silently
    replace the other on disk."""
    s = np.asarray(sigma_rel, dtype=np.float64)
    bad = ~((s > 0) & (s < MAX_SIGMA_REL))  # also catches NaN
    if np.any(bad):
        raise EDM2Error(f"{name}={np.atleast_1d(s)[np.atleast_1d(bad)].tolist()}: every EMA length sigma_rel "
                         f"must lie in (0, {MAX_SIGMA_REL:.4f}); {MAX_SIGMA_REL:.4f} is the flat average "
                         f"of all of training")
    if distinct:
        seen = {}
        for v in np.atleast_1d(s).tolist():
            key = snapshot_name(1, v)
            if key in seen:
                given = f"{name}={','.join(map(str, np.atleast_1d(s).tolist()))}"
                if seen[key] == v:
                    raise EDM2Error(f"{given}: every value must be different ({v} is given twice)")
                raise EDM2Error(f"{given}: {seen[key]} and {v} would share the snapshot file name "
                                f"...-{key.rsplit('-', 1)[1]} (3 decimals), so one profile would be lost; give EMA "
                                f"lengths that differ in the first 3 decimals")
            seen[key] = v
    return s


def exp_to_std(gamma):
    """Relative standard deviation of the power-function profile (Eq. 123):
    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    gamma = np.asarray(gamma, dtype=np.float64)
    if np.any(~(gamma > -1)):
        raise EDM2Error(f"gamma={gamma.tolist()}: the power-function exponent must be > -1")
    out = np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
    return out if out.ndim else float(out)


def std_to_exp(sigma_rel):
    """Exponent gamma for a relative width: the largest real root of
    f(g) = g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = (g+2)^2 (g+3) - (g+1)/s^2 (Eq. 125).

    Vectorised Newton iteration started at g0 = 1/s: there f(g0) = 6/s^2 + 16/s + 12 > 0,
    and f is convex and increasing right of its largest root (> 0 for s < MAX_SIGMA_REL),
    so the iterates decrease monotonically onto that root."""
    s = check_sigma_rel(sigma_rel)
    c = s ** -2
    g = 1 / s
    for _ in range(100):
        f = (g + 2) ** 2 * (g + 3) - c * (g + 1)
        step = f / (3 * g ** 2 + 14 * g + 16 - c)
        g = g - step
        if np.all(np.abs(step) <= 1e-15 * np.maximum(1, np.abs(g))):
            break
    return g if g.ndim else float(g)


def power_function_beta(sigma_rel, t_next, t_delta):
    """EMA decay for the update that brings the image count to t_next with a
    batch of t_delta: beta = (1 - t_delta / t_next)^(gamma + 1) (Eq. 127).
    Counting images, not steps; the first update (t_next == t_delta) gives 0 (a copy).
    Broadcasts over all three arguments."""
    gamma = np.asarray(std_to_exp(sigma_rel))
    t_next = np.asarray(t_next, np.float64)
    t_delta = np.asarray(t_delta, np.float64)
    if np.any(~(t_delta > 0)) or np.any(t_next < t_delta):
        raise EDM2Error("power_function_beta: need 0 < t_delta <= t_next (image counts after the step)")
    out = (1 - t_delta / t_next) ** (gamma + 1)
    return out if out.ndim else float(out)


def _check_times(t, name):
    t = np.asarray(t, np.float64)
    if np.any(~(t > 0)) or np.any(~np.isfinite(t)):
        raise EDM2Error(f"`{name}`: every profile end time must be a positive number of training images")
    return t


def profile_inner_product(t_a, sigma_rel_a, t_b, sigma_rel_b):
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) d tau of two power-function
    profiles (Eq. 151, Algorithm 3), broadcasting:
    (g_a+1)(g_b+1) (t_a/t_b)^e / ((g_a+g_b+1) max(t_a, t_b)), e = g_b if t_a < t_b else -g_a."""
    t_a = _check_times(t_a, "t_a")
    t_b = _check_times(t_b, "t_b")
    g_a = np.asarray(std_to_exp(sigma_rel_a), np.float64)
    g_b = np.asarray(std_to_exp(sigma_rel_b), np.float64)
    t_exp = np.where(t_a < t_b, g_b, -g_a)
    num = (g_a + 1) * (g_b + 1) * (t_a / t_b) ** t_exp
    return num / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def _inputs_and_outputs(in_t, in_sigma_rel, out_t, out_sigma_rel):
    in_t = _check_times(in_t, "in_t").ravel()
    in_sigma_rel = np.broadcast_to(np.asarray(in_sigma_rel, np.float64), in_t.shape).ravel()
    out_t, out_sigma_rel = np.broadcast_arrays(np.atleast_1d(_check_times(out_t, "out_t")).ravel(),
                                         np.atleast_1d(np.asarray(out_sigma_rel, np.float64)).ravel())
    check_sigma_rel(in_sigma_rel, "in_sigma_rel")
    check_sigma_rel(out_sigma_rel, "out_sigma_rel")
    return in_t, in_sigma_rel, out_t, out_sigma_rel


def solve_posthoc_coefficients(in_t, in_sigma_rel, out_t, out_sigma_rel):
    """Least-squares combination of stored profiles that best matches each
    wanted profile in L2 (Sec. 3.2, App. C.5, Eqs. 129-143): solve A X = B with
    A[i, i'] = <p_i, p_i'> and B[i, j] = <p_i, p_j>, then normalise every column
    to sum 1 (so a constant parameter is reproduced exactly). Returns X of shape
    [len(in), len(out)]: theta_out[j] = sum_i X[i, j] theta_in[i]."""
    in_t, in_sigma_rel, out_t, out_sigma_rel = _inputs_and_outputs(in_t, in_sigma_rel, out_t, out_sigma_rel)
    if len(in_t) < 1:
        raise EDM2Error("solve_posthoc_coefficients: no stored profiles")
    A = profile_inner_product(in_t[:, None], in_sigma_rel[:, None], in_t[None, :], in_sigma_rel[None, :])
    B = profile_inner_product(in_t[:, None], in_sigma_rel[:, None], out_t[None, :], out_sigma_rel[None, :])
    try:
        X = np.linalg.solve(A, B)
    except np.linalg.LinAlgError:
        raise EDM2Error("solve_posthoc_coefficients: the stored profiles are linearly dependent "
                         "(two snapshots with the same time and EMA length?)") from None
    return X / X.sum(axis=0, keepdims=True)


def profile_density(tau, t, sigma_rel):
    """p(tau) = (gamma+1) tau^gamma / t^(gamma+1) for 0 <= tau <= t, else 0 (broadcasting)."""
    tau = np.asarray(tau, np.float64)
    t = _check_times(t, "t")
    g = np.asarray(std_to_exp(sigma_rel), np.float64)
    x = np.clip(tau / t, 0, None)
    return np.where((tau >= 0) & (tau <= t), (g + 1) * x ** g / t, 0.0)


def profile_fit_error(in_t, in_sigma_rel, coeffs, out_t, out_sigma_rel):
    """Relative L2 error ||sum_i X[i,j] p_i - p_j|| / ||p_j|| of each realised
    profile, exactly, from the inner products (no sampling of tau). With the
    solution of solve_posthoc_coefficients this is the paper's residual; it bounds
    the parameter error: |theta_hat - theta| <= err ||p_j|| ||theta(.) - c||_2
    for any constant c (Cauchy-Schwarz, since sum_i X[i,j] = 1)."""
    in_t, in_sigma_rel, out_t, out_sigma_rel = _inputs_and_outputs(in_t, in_sigma_rel, out_t, out_sigma_rel)
    X = np.asarray(coeffs, np.float64).reshape(len(in_t), len(out_t))
    A = profile_inner_product(in_t[:, None], in_sigma_rel[:, None], in_t[None, :], in_sigma_rel[None, :])
    B = profile_inner_product(in_t[:, None], in_sigma_rel[:, None], out_t[None, :], out_sigma_rel[None, :])
    P = profile_inner_product(out_t, out_sigma_rel, out_t, out_sigma_rel)
    sq = np.einsum("ij,ik,kj->j", X, A, X) - 2 * np.einsum("ij,ij->j", X, B) + P
    return np.sqrt(np.clip(sq, 0, None) / P)
