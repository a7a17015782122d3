"""Exact 2D ground truth of the toy example: a Gaussian mixture shaped like a
branching tree (autoguidance paper, arXiv 2406.02507, Sec. 3 and Fig. 1).

Diffusing a mixture with noise sigma keeps it a mixture: every component
N(mu_k, Sigma_k) becomes N(mu_k, Sigma_k + sigma^2 I). So the density
p(x; sigma), its score grad_x log p(x; sigma) and samples of the noisy
distribution are all exact.

Speed: for one sigma, log(phi_k N(x; mu_k, Sigma'_k)) is a quadratic
polynomial in x, i.e. the product of the 6 features
[x0^2, 2 x0 x1, x1^2, x0, x1, 1] with a per-component coefficient vector,
so all 1016 components of a class are scored by one matrix product; that is
what makes training on a CPU practical. The expanded quadratic cancels for
the thinnest components, so evaluation defaults to float64; training uses
float32 (errors ~0.01 nats only at sigma < 0.01).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..utils.errors import EDM2Error

CLASSES = ("A", "B", "AB")


class GaussianMixture:
    """sum_k phi_k N(x; mu_k, Sigma_k) in 2D, evaluated under added noise sigma.

    sigma may be a scalar or one value per point; points that share a sigma
    are evaluated together (one matrix product per distinct value), so a few
    distinct values are fast and thousands are slow.
    """

    def __init__(self, phi, mu, Sigma):
        phi = np.asarray(phi, np.float64)
        if phi.ndim != 1 or len(phi) == 0 or np.any(phi <= 0):
            raise EDM2Error("GaussianMixture: phi must be a non-empty vector of positive weights")
        self.phi = torch.as_tensor(phi / phi.sum())                                    # [K] float64
        self.mu = torch.as_tensor(np.asarray(mu, np.float64))                           # [K, 2]
        L, Q = np.linalg.eigh(np.asarray(Sigma, np.float64))                             # Sigma = Q diag(L) Q^T
        self.L = torch.as_tensor(L)                                                      # [K, 2]
        self.Q = torch.as_tensor(Q)                                                      # [K, 2, 2]

    def __len__(self):
        return len(self.phi)

    def _coefficients(self, sigma):
        """For noise levels sigma [S]: the [S, 6, K] coefficients of the log terms
        and the [S, 5, K] rows (P mu, P00, P01, P11) of the score, where
        P = (Sigma_k + sigma^2 I)^-1 = Q diag(1 / (L + sigma^2)) Q^T."""
        inv = 1 / (self.L + sigma[:, None, None] ** 2)                                   # [S, K, 2]
        Q = self.Q
        a = Q[:, 0, 0] ** 2 * inv[..., 0] + Q[:, 0, 1] ** 2 * inv[..., 1]
        b = Q[:, 0, 0] * Q[:, 1, 0] * inv[..., 0] + Q[:, 0, 1] * Q[:, 1, 1] * inv[..., 1]
        c = Q[:, 1, 0] ** 2 * inv[..., 0] + Q[:, 1, 1] ** 2 * inv[..., 1]
        m0, m1 = self.mu[:, 0], self.mu[:, 1]
        Pm0, Pm1 = a * m0 + b * m1, b * m0 + c * m1
        const = (self.phi.log() - math.log(2 * math.pi) + 0.5 * inv.log().sum(-1)
                 - 0.5 * (m0 * Pm0 + m1 * Pm1))
        # log(phi N(x; mu, P^-1)) = -1/2 (x - mu)^T P (x - mu) + const', expanded in the features.
        coef = torch.stack([-0.5 * a, -0.5 * b, -0.5 * c, Pm0, Pm1, const], dim=1)       # [S, 6, K]
        rows = torch.stack([Pm0, Pm1, a, b, c], dim=1)                                   # [S, 5, K]
        return coef, rows

    @staticmethod
    def _features(x):
        x0, x1 = x[..., 0], x[..., 1]
        return torch.stack([x0 * x0, 2 * x0 * x1, x1 * x1, x0, x1, torch.ones_like(x0)], dim=-1)

    def _apply(self, fn, x, sigma, dtype, chunk=8192):
        """Evaluate fn(logw [S, m, K], x [S, m, 2], rows [S, 5, K]) -> [S, m, ...] with the
        points grouped by sigma (padded to equal group sizes), and scatter back;
        at most `chunk` points at a time to bound memory."""
        x = torch.as_tensor(x)
        if x.shape[-1] != 2:
            raise EDM2Error(f"GaussianMixture: points must have shape [..., 2], got {list(x.shape)}")
        n = x.numel() // 2
        if n > chunk:
            flat = x.reshape(-1, 2)
            sig = torch.as_tensor(sigma, dtype=torch.float64)
            sig = sig.reshape(1).expand(n) if sig.numel() == 1 else sig.broadcast_to(x.shape[:-1]).reshape(-1)
            out = torch.cat([self._apply(fn, flat[i:i + chunk], sig[i:i + chunk], dtype, chunk)
                             for i in range(0, n, chunk)])
            return out.reshape(*x.shape[:-1], *out.shape[1:])
        dtype = dtype or x.dtype
        flat = x.reshape(-1, 2).to(dtype)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.numel() == 1:
            values, group = sigma.reshape(1), torch.zeros(len(flat), dtype=torch.long)
        else:
            values, group = torch.unique(sigma.broadcast_to(x.shape[:-1]).reshape(-1), return_inverse=True)
        counts = torch.bincount(group, minlength=len(values))
        order = torch.argsort(group, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.empty_like(group)
        pos[order] = torch.arange(len(group)) - starts[group[order]]
        padded = flat.new_zeros([len(values), int(counts.max()) if len(flat) else 0, 2])
        padded = padded.index_put((group, pos), flat)
        coef, rows = (t.to(dtype) for t in self._coefficients(values))
        out = fn(self._features(padded) @ coef, padded, rows)[group, pos]
        return out.reshape(*x.shape[:-1], *out.shape[1:]).to(x.dtype)

    def logp(self, x, sigma=0, dtype=torch.float64):
        """log p(x; sigma) for x: [..., 2] (differentiable w.r.t. x). Computed in
        `dtype`: float32 is faster but loses ~0.01 nats for the thinnest components."""
        return self._apply(lambda logw, xs, rows: torch.logsumexp(logw, dim=-1), x, sigma, dtype)

    def score(self, x, sigma=0, dtype=torch.float64):
        """grad_x log p(x; sigma) = sum_k w_k P_k (mu_k - x), w_k the posterior
        responsibilities softmax_k(log phi_k N(x; mu_k, Sigma'_k))."""
        def one(logw, xs, rows):
            r = (rows @ logw.softmax(dim=-1).transpose(1, 2)).transpose(1, 2)            # [S, m, 5]
            return torch.stack([r[..., 0] - r[..., 2] * xs[..., 0] - r[..., 3] * xs[..., 1],
                                r[..., 1] - r[..., 3] * xs[..., 0] - r[..., 4] * xs[..., 1]], dim=-1)
        return self._apply(one, x, sigma, dtype)

    def denoise(self, x, sigma):
        """Ideal denoiser D(x; sigma) = x + sigma^2 grad log p(x; sigma) (Tweedie's formula)."""
        s = torch.as_tensor(sigma, dtype=x.dtype).broadcast_to(x.shape[:-1])[..., None]
        return x + s ** 2 * self.score(x, sigma)

    def __call__(self, x, sigma, labels=None):
        """Denoiser interface net(x, sigma, labels) of edm2.sampling.edm_sampler (labels ignored)."""
        return self.denoise(x, sigma)

    def sample(self, n: int, sigma=0, generator=None, dtype=torch.float32):
        """n points from p(x; sigma): pick a component by weight, add its
        (Sigma_k + sigma^2 I)^(1/2)-shaped Gaussian noise."""
        k = torch.multinomial(self.phi, n, replacement=True, generator=generator)
        eps = torch.randn([n, 2], generator=generator, dtype=torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).broadcast_to([n])
        scaled = eps * (self.L[k] + sigma[:, None] ** 2).sqrt()                          # in the eigenbasis
        return (self.mu[k] + torch.einsum("nij,nj->ni", self.Q[k], scaled)).to(dtype)


@functools.cache
def _tree_components(seed=2, depth_limit=7):
    """Components of both classes, as (class, phi, mu, Sigma) tuples.

    Each class is a recursive tree: a branch at depth d has length
    0.292 * 0.8^d (jittered by 20%), is drawn as a chain of 8 thin Gaussians
    elongated along the branch, carries weight length * 0.5^d per component,
    and forks into two children turning by +-0.7^d radians (jittered). Class A
    grows towards the upper right (45 deg), class B the opposite way. The
    shape parameters are the paper's (its released toy example).
    """
    rng = np.random.RandomState(seed)
    origin = np.array([0.0030, 0.0325])
    scale = np.array([1.3136, 1.3844])
    comps = []

    def branch(cls, depth, pos, angle):
        if depth >= depth_limit:
            return
        d = np.array([np.cos(angle), np.sin(angle)])
        length = 0.292 * 0.8 ** depth * (1 + 0.2 * rng.randn())
        thick = 0.2 * 0.8 ** depth / length                      # across-branch std relative to along
        size = scale * length * 0.06
        along = np.outer(d, d)
        cov = (along + (np.eye(2) - along) * thick ** 2) * np.outer(size, size)
        for t in np.linspace(0.07, 0.93, 8):
            comps.append((cls, length * 0.5 ** depth, (pos + d * length * t) * scale, cov))
        for sign in (1, -1):
            turn = sign * 0.7 ** depth * (1 + 0.2 * rng.randn())
            branch(cls, depth + 1, pos + d * length, angle + turn)

    branch("A", 0, origin, np.pi / 4)
    branch("B", 0, origin, np.pi * 5 / 4)
    return tuple(comps)


@functools.cache
def tree_mixture(classes: str = "A") -> GaussianMixture:
    """The ground truth of class 'A', 'B' or both ('AB') as a GaussianMixture."""
    if classes not in CLASSES:
        raise EDM2Error(f"classes={classes!r}: choose one of A, B, AB")
    sel = [c for c in _tree_components() if c[0] in classes]
    return GaussianMixture([c[1] for c in sel], [c[2] for c in sel], [c[3] for c in sel])
