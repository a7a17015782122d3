"""Magnitude-preserving primitives of EDM2 (paper Sec. 2.2-2.5, config G; App. B.4-B.7, Eqs. 47, 66, 75, 81, 88, 103).

Every function here keeps the expected RMS of unit-variance inputs at 1:
that is the property the paper builds the whole network on.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.errors import EDM2Error


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
        raise EDM2Error(f"resample_filter={list(f)} is not supported; only [1, 1] (the paper's box filter)")
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    raise EDM2Error(f"resample mode={mode!r}; allowed: 'keep', 'down', 'up'")


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


def _force_normalize_(weight: torch.Tensor, eps: float = 1e-4) -> None:
    """Forced weight normalisation in place (paper Eq. 66, Algorithm 1): each output
    channel of `weight` divided by eps + its RMS; the same arithmetic as `normalize`,
    without a temporary of the weight's size. Call under torch.no_grad().

    A compiled graph would drop this in-place update of a parameter, so MPConv
    skips it while torch.compile traces and `force_normalize_` does it eagerly."""
    w = weight if weight.dtype == torch.float32 else weight.to(torch.float32)
    norm = torch.linalg.vector_norm(w, dim=list(range(1, w.ndim)), keepdim=True, dtype=torch.float32)
    w.div_(torch.add(eps, norm, alpha=math.sqrt(1 / w[0].numel())))
    if w is not weight:
        weight.copy_(w)


class _TrainingWeight(torch.autograd.Function):
    """Standard weight normalisation and the magnitude-preserving scale of a
    training-mode MPConv as one autograd node (paper Eq. 47, Algorithm 1):
    out = weight * gain / (sqrt(fan_in) (eps + ||weight|| / sqrt(fan_in))) per output channel.

    The same arithmetic as `normalize` and a multiply, with fewer passes over
    the weights and no temporaries of their size but the output and its
    gradient. Backward, per channel with n = ||w||, d = eps + n / sqrt(fan_in),
    c = gain / sqrt(fan_in) and s = c / d:
    dL/dw = s g - s (g.w) / (d n sqrt(fan_in)) w, and dL/dgain = sum (g.w) / d / sqrt(fan_in).
    It does not modify its input: the forced normalisation stays outside
    (`_force_normalize_`), where torch.compile sees the in-place update.
    """

    @staticmethod
    def forward(ctx, weight, gain, eps):
        with torch.profiler.record_function("edm2::weight_norm"):
            w = weight.to(torch.float32)
            fan_in = w[0].numel()
            alpha = math.sqrt(1 / fan_in)   # sqrt(norm.numel() / x.numel()), as in `normalize`
            norm = torch.linalg.vector_norm(w, dim=list(range(1, w.ndim)), keepdim=True, dtype=torch.float32)
            d = torch.add(eps, norm, alpha=alpha)
            s = (gain / math.sqrt(fan_in)) / d
            ctx.save_for_backward(w, norm, d, s)
            ctx.alpha, ctx.fan_in, ctx.gain_is_tensor = alpha, fan_in, isinstance(gain, torch.Tensor)
            return w * s

    @staticmethod
    def backward(ctx, g):
        with torch.profiler.record_function("edm2::weight_norm"):
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


def apply_weight(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A bias-free layer's weight `w` applied to `x` in x's dtype: x @ w^T for a
    fully connected [out, in] weight, else a convolution with 'same' padding."""
    w = w.to(x.dtype)
    if w.ndim == 2:
        return x @ w.t()
    return F.conv2d(x, w, padding=(w.shape[-1] // 2,))


class MPConv(torch.nn.Module):
    """Convolution or fully connected layer with forced weight normalisation.

    Paper App. B.4-B.5 (Eqs. 47, 66; Algorithm 1): in training mode the stored weight is
    re-normalised to unit RMS per output channel before every use, and the
    forward pass normalises it once more inside autograd, then scales by
    gain / sqrt(fan_in) (fused in `_TrainingWeight`). There is no bias.

    Under torch.compile the first step, an in-place update of the parameter,
    is left out of the traced forward (a graph would lose it): call
    `force_normalize_(net)` before every compiled training-mode call, as
    `edm2 train --compile` and `edm2.train.speed.compile_loss` do.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=()):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        if self.training:
            if not torch.compiler.is_compiling():  # compiled: done eagerly before the call (force_normalize_)
                with torch.no_grad():
                    _force_normalize_(self.weight)  # forced weight normalisation
            w = _TrainingWeight.apply(self.weight, gain, 1e-4)
        else:
            w = normalize(self.weight.to(torch.float32))
            w = w * (gain / np.sqrt(w[0].numel()))
        return apply_weight(x, w)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={list(self.weight.shape[2:])}"


def force_normalize_(net: torch.nn.Module) -> torch.nn.Module:
    """The forced weight normalisation of every MPConv in `net` (paper Eq. 66,
    Algorithm 1), in place and eagerly; returns `net`. A training-mode MPConv
    does this itself at each call, except inside a torch.compile graph: call
    this before every compiled training-mode forward pass, so that compiled
    training updates the weights exactly as eager training does."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, MPConv):
                _force_normalize_(m.weight)
    return net
