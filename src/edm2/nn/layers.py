"""Magnitude-preserving primitives of EDM2 (paper Sec. 2.2-2.5, config G; App. B.4-B.7, Eqs. 47, 66, 75, 81, 88, 103).

Every function here keeps the expected RMS of unit-variance inputs at 1:
that is the property the paper builds the whole network on.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["normalize", "mp_silu", "mp_sum", "mp_cat", "resample", "MPFourier", "MPConv"]


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Divide x by (eps + RMS over `dim`); default dim = all but the first.

    The norm is computed in float32 (float64 for float64 input); the division happens in x's dtype
    (paper Eq. 46, the pixel norm and the weight normalisation of Sec. 3.2).
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=dtype)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to unit output RMS for unit-normal input (Sec. B.2)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving weighted sum, a lerp rescaled (paper Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation with balance t (paper Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


def resample(x: torch.Tensor, mode: str = "keep", f=(1, 1)) -> torch.Tensor:
    """Resampling with the box filter [1, 1]: 2x2 average pool or nearest 2x up."""
    if tuple(f) != (1, 1):
        raise ValueError(f"resample_filter={list(f)} is not supported; only [1, 1] (the paper's box filter)")
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    raise ValueError(f"resample mode={mode!r}; allowed: 'keep', 'down', 'up'")


class MPFourier(torch.nn.Module):
    """Random Fourier features of a scalar, magnitude preserving (Sec. B.2)."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32)
        y = torch.outer(y, self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * np.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """Convolution or fully connected layer with forced weight normalisation.

    Paper Sec. 3.2 / Eq. 81-85: in training mode the stored weight is
    re-normalised to unit RMS per output channel before every use, and the
    forward pass normalises it once more inside autograd, then scales by
    gain / sqrt(fan_in). There is no bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=()):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation
        w = normalize(w)  # standard weight normalisation (inside autograd)
        w = (w * (gain / np.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={list(self.weight.shape[2:])}"
