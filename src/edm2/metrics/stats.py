"""Feature statistics and the Fréchet distance (paper App. D.4, A.5).

`FeatureStats` accumulates the sum and the sum of outer products of feature
vectors in float64 (so batches, and processes under torchrun, can be merged
exactly by adding), and gives the mean and the unbiased covariance (÷ (N-1)).

`frechet_distance(mu1, sigma1, mu2, sigma2)` = |mu1 - mu2|^2 + tr(S1 + S2 -
2 (S1 S2)^(1/2)) in float64. The trace of the square root is the nuclear norm
of S1^(1/2) S2^(1/2) (`trace_sqrt_product`): two symmetric eigendecompositions
and one SVD replace a general (and fragile) sqrtm: no complex parts, no NaNs,
and no sqrt(eps) round-off for singular covariances.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.distributed as dist

from ..utils.errors import EDM2Error


class FeatureStats:
    """Running mean and covariance of feature vectors, in float64.

    append(features [N, D]) adds a batch; merge(other) / all_reduce() add the
    sums of other accumulators (other processes); mean(), cov() read them."""

    def __init__(self, dim: int, device="cpu"):
        self.dim = int(dim)
        self.num = 0
        self.sum = torch.zeros([self.dim], dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros([self.dim, self.dim], dtype=torch.float64, device=device)

    def append(self, features) -> None:
        x = torch.as_tensor(features).to(self.sum.device, torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise EDM2Error(f"FeatureStats: features of shape {list(x.shape)}, expected [N, {self.dim}]")
        self.num += x.shape[0]
        self.sum += x.sum(0)
        self.sum_sq += x.T @ x

    def merge(self, other: FeatureStats) -> None:
        if other.dim != self.dim:
            raise EDM2Error(f"FeatureStats: cannot merge {other.dim}-d statistics into {self.dim}-d ones")
        self.num += other.num
        self.sum += other.sum.to(self.sum.device)
        self.sum_sq += other.sum_sq.to(self.sum.device)

    def all_reduce(self) -> None:
        """Sum the statistics over every torch.distributed process (no-op without a process group)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        comm = self.sum.device if dist.get_backend() == "nccl" else torch.device("cpu")
        n = torch.tensor([float(self.num)], dtype=torch.float64, device=comm)
        s, ss = self.sum.to(comm), self.sum_sq.to(comm)
        for t in (n, s, ss):
            dist.all_reduce(t)
        self.num, self.sum, self.sum_sq = int(n.item()), s.to(self.sum.device), ss.to(self.sum.device)

    def mean(self) -> np.ndarray:
        if self.num < 1:
            raise EDM2Error("FeatureStats: no features were added")
        return (self.sum / self.num).cpu().numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance (÷ (N-1)); warns when N is below the feature dimension."""
        if self.num < 2:
            raise EDM2Error(f"FeatureStats: a covariance needs at least 2 samples, got {self.num}")
        if self.num < self.dim:
            warnings.warn(f"only {self.num} images for {self.dim}-d features: the covariance is singular and the "
                          f"Fréchet distance is strongly biased; use at least {self.dim} (the paper uses 50000)",
                          stacklevel=2)
        mu = self.sum / self.num
        cov = (self.sum_sq - self.num * torch.outer(mu, mu)) / (self.num - 1)
        return ((cov + cov.T) / 2).cpu().numpy()


def sqrt_psd(a) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative
    eigenvalues from round-off are clipped to 0)."""
    w, v = np.linalg.eigh(np.asarray(a, np.float64))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """tr((S1 S2)^(1/2)) for covariance matrices. S1 S2 has the eigenvalues of
    S1^(1/2) S2 S1^(1/2) = M M^T with M = S1^(1/2) S2^(1/2), so the trace is the
    sum of the singular values of M. Taking them directly (instead of square
    roots of eigenvalues) keeps round-off at ~1e-16 for singular covariances."""
    m = sqrt_psd(sigma1) @ sqrt_psd(sigma2)
    return float(np.linalg.svd(m, compute_uv=False).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of two Gaussians, float64:
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise EDM2Error(f"frechet_distance: shapes mu1 {list(mu1.shape)}, sigma1 {list(sigma1.shape)}, mu2 "
                         f"{list(mu2.shape)}, sigma2 {list(sigma2.shape)}; expected [D], [D, D] for one D")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(value)
