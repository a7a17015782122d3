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
    (the weight normalisation of paper Eq. 47 and the pixel norm of Eq. 30).
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=dtype)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to unit output RMS for unit-normal input (paper Eq. 81)."""
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
    """Random Fourier features of a scalar, magnitude preserving (paper Eqs. 35-36, 75)."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32)
        y = torch.outer(y, self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * np.sqrt(2)).to(x.dtype)


class _TrainingWeight(torch.autograd.Function):
    """Forced weight normalisation, standard weight normalisation and the
    magnitude-preserving scale of a training-mode MPConv, fused (paper Eqs. 47, 66;
    Algorithm 1): in place, weight <- weight / (eps + ||weight|| / sqrt(fan_in))
    per output channel; then out = weight * gain / (sqrt(fan_in) (eps + ||weight|| / sqrt(fan_in))).

    The same arithmetic as `normalize` twice and a multiply, with fewer passes
    over the weights (they are read 2x in forward, 3x in backward, instead of
    about 5x and 8x through autograd) and no temporaries of their size but the
    output and its gradient. Backward, per channel with n = ||w||,
    d = eps + n / sqrt(fan_in), s = c / d and c = gain / sqrt(fan_in):
    dL/dw = s g - s (g.w) / (d n sqrt(fan_in)) w, and dL/dgain = sum (g.w) / d / sqrt(fan_in).
    """

    @staticmethod
    def forward(ctx, weight, gain, eps):
        with torch.profiler.record_function("edm2::weight_norm"):
            return _TrainingWeight._forward(ctx, weight, gain, eps)

    @staticmethod
    def _forward(ctx, weight, gain, eps):
        w = weight if weight.dtype == torch.float32 else weight.to(torch.float32)
        dims = list(range(1, w.ndim))
        fan_in = w[0].numel()
        alpha = math.sqrt(1 / fan_in)   # sqrt(norm.numel() / x.numel()), as in `normalize`
        norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True, dtype=torch.float32)
        w.div_(torch.add(eps, norm, alpha=alpha))        # forced weight normalisation
        if w is not weight:
            weight.copy_(w)
        norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True, dtype=torch.float32)
        d = torch.add(eps, norm, alpha=alpha)            # standard weight normalisation
        s = (gain / math.sqrt(fan_in)) / d
        ctx.save_for_backward(w, norm, d, s)
        ctx.alpha, ctx.fan_in, ctx.gain_is_tensor = alpha, fan_in, isinstance(gain, torch.Tensor)
        return w * s

    @staticmethod
    def backward(ctx, g):
        with torch.profiler.record_function("edm2::weight_norm"):
            return _TrainingWeight._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        w, norm, d, s = ctx.saved_tensors
        g = g.to(torch.float32)
        out = w.shape[0]
        if g.is_contiguous() and w.is_contiguous():   # one pass over both: per-channel dot products
            gw = torch.bmm(g.reshape(out, 1, -1), w.reshape(out, -1, 1)).reshape(norm.shape)
        else:
            gw = (g * w).sum(list(range(1, w.ndim)), keepdim=True)
        k = torch.where(norm > 0, s * gw * ctx.alpha / (d * norm), torch.zeros_like(norm))
        grad_w = (g * s).addcmul_(w, k, value=-1)
        grad_gain = None
        if ctx.gain_is_tensor and ctx.needs_input_grad[1]:
            grad_gain = (gw / d).sum() / math.sqrt(ctx.fan_in)
        return grad_w, grad_gain, None


class MPConv(torch.nn.Module):
    """Convolution or fully connected layer with forced weight normalisation.

    Paper App. B.4-B.5 (Eqs. 47, 66; Algorithm 1): in training mode the stored weight is
    re-normalised to unit RMS per output channel before every use, and the
    forward pass normalises it once more inside autograd, then scales by
    gain / sqrt(fan_in) (fused in `_TrainingWeight`). There is no bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=()):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        if self.training:
            w = _TrainingWeight.apply(self.weight, gain, 1e-4)
        else:
            w = normalize(self.weight.to(torch.float32))
            w = w * (gain / np.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={list(self.weight.shape[2:])}"
