"""EDM preconditioning, the learned uncertainty head and the precision knob:
what every config's network (A-G) shares (paper App. B.1 Eqs. 4-8, App. B.2 Eq. 21).

`Denoiser` is the common base of `edm2.nn.Precond` (G), `edm2.nn.rungs.LadderPrecond`
(C-F) and `edm2.nn.adm.ADMPrecond` (A-B). It holds no modules itself: each
subclass builds its U-Net and, where it has one, its uncertainty head, in the
order of the authors' code, which fixes both the state dict's key order and the
random numbers each layer draws when seeded.
"""
from __future__ import annotations

import math
import numbers

import torch

from ..utils.errors import EDM2Error

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""The U-Net's dtype on CUDA, by name (`precision`)."""


def check_precision(name: str, value: str) -> str:
    """`value` if it names a dtype of `DTYPES` ('fp16', 'bf16', 'fp32'), else
    `EDM2Error` naming the argument `name` and the allowed values."""
    if value not in DTYPES:
        raise EDM2Error(f"{name}={value!r}: allowed: {', '.join(DTYPES)}")
    return value


def check_sigma_data(name: str, value) -> float:
    """`value` as a float if it is a finite number > 0 (sigma_data, the standard
    deviation of the training data, paper Eqs. 4-7), else `EDM2Error` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise EDM2Error(f"{name}={value!r}: must be a finite number > 0 (0.5 for images and the SD latents)")
    return float(value)


def check_dropout(name: str, value) -> float:
    """`value` as a float if it is a dropout probability in [0, 1), else
    `EDM2Error` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise EDM2Error(f"{name}={value!r}: must be in [0, 1)")
    return float(value)


def set_precision(net: Denoiser, precision: str) -> None:
    """Choose the U-Net dtype on CUDA: 'fp32', 'fp16' (reference) or 'bf16'."""
    net.precision = check_precision("precision", precision)


def precision_kwargs(net_kwargs: dict | None) -> dict | None:
    """Stored `Precond` arguments with the older pair use_fp16 (the authors'
    name) / reduced_dtype (edm2 0.1) replaced by the one `precision` knob.
    None (a snapshot of a module that is not an edm2 network) stays None."""
    if net_kwargs is None:
        return None
    kwargs = dict(net_kwargs)
    if "use_fp16" in kwargs or "reduced_dtype" in kwargs:
        use_fp16 = kwargs.pop("use_fp16", True)
        reduced = kwargs.pop("reduced_dtype", "fp16")
        kwargs.setdefault("precision", reduced if use_fp16 else "fp32")
    return kwargs


def precond_coefficients(sigma: torch.Tensor, sigma_data: float):
    """EDM preconditioning (Karras et al. 2022, Table 1; paper Eqs. 4-7): c_skip, c_out, c_in, c_noise."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class Denoiser(torch.nn.Module):
    """A preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
    (paper Eqs. 4-7) around a U-Net F, with the log-variance u(sigma) of the
    learned uncertainty of the loss (App. B.2, Eq. 21) on request.

    Every config's network has this forward signature,
    `net(x, sigma, class_labels=None, force_fp32=False, return_logvar=False)`.
    A subclass calls `Denoiser.__init__` first, then builds F as the attribute
    named by `backbone` and, for the uncertainty, `logvar_fourier` (Fourier
    features of c_noise) and `logvar_linear` (one layer to one channel).

    `precision` is the dtype F runs in when the input is on CUDA: 'fp16' (as the
    reference), 'bf16' or 'fp32'; on the CPU it always runs in float32.
    """

    config: str  # the row of the paper's Table 1 (edm2.nn.build_network), set by each subclass
    backbone: str = "unet"  # the attribute holding F

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, precision: str = "fp16",
                 sigma_data: float = 0.5):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.precision = check_precision("precision", precision)
        self.sigma_data = check_sigma_data("sigma_data", sigma_data)

    @property
    def device(self) -> torch.device:
        """Where the weights are (diffusers' pipelines read `component.device`)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored weights (diffusers' pipelines read `component.dtype`).
        The U-Net computes in float32, or in `precision` on CUDA, whatever it is."""
        return next(self.parameters()).dtype

    def compute_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        """The dtype F runs in for input on `device`."""
        if not force_fp32 and device.type == "cuda":
            return DTYPES[self.precision]
        return torch.float32

    def forward(self, x, sigma, class_labels=None, force_fp32: bool = False, return_logvar: bool = False):
        x, sigma, class_labels, dtype = self._inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = precond_coefficients(sigma, self.sigma_data)
        c_noise = c_noise.flatten()
        F_x = getattr(self, self.backbone)((c_in * x).to(dtype), c_noise, class_labels)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return D_x, logvar

    def _inputs(self, x, sigma, class_labels=None, force_fp32: bool = False):
        """The inputs as F takes them: x and sigma ([N, 1, 1, 1]) in float32;
        labels as float32 [-1, label_dim] (None for an unconditional net, one
        all-zero row when a conditional net gets none); and F's dtype."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels, self.compute_dtype(x.device, force_fp32)
