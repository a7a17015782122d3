"""Configs C, D, E and F of the paper's ablation ladder (Table 1, App. B.3-B.6).

One network with named switches. Each config is a `Rung` (plain data); the
differences between neighbouring rungs are exactly the switches that change:

    C  architectural streamlining (Sec. 2.1, App. B.3, Fig. 18): no biases,
       constant-1 input channel, scale-only conditioning, GN-RMS (Eq. 29),
       cosine attention (Eq. 30-34), Fourier noise features, uniform init.
    D  magnitude-preserving learned layers (Sec. 2.2, App. B.4, Eq. 47):
       weight_norm 'none' -> 'standard', init N(0, 1).
    E  controlled effective learning rate (Sec. 2.3, App. B.5, Eq. 66):
       weight_norm 'standard' -> 'forced'. (The other half of E, the
       inverse-square-root learning rate, is part of the training recipe.)
    F  no group normalisations (Sec. 2.4, App. B.6): group_norm off,
       pixel_norm on, resample_on_main_path on, embedding_layers 2 -> 1,
       output_block 'norm_silu_conv' -> 'conv'.

Config G, the magnitude-preserving fixed-function layers (Sec. 2.5), is
`edm2.nn.Precond`; F is G without the MP scalings (plain SiLU, sum and
concatenation, Fourier features without the sqrt(2)) and without the two kinds
of learned zero-initialised gains. Module names and creation order follow
`edm2.nn.UNet`, so an F state dict is G's minus `out_gain` and `*.emb_gain`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.errors import EDM2Error
from .denoiser import Denoiser, check_dropout
from .layers import MPConv, MPFourier, apply_weight, normalize, resample
from .unet import Block, check_architecture, check_block, unet_encode_decode, unet_layout


@dataclass(frozen=True)
class Rung:
    """The architecture switches of one config of the ladder."""
    name: str
    weight_norm: str            # 'none' (C), 'standard' (D, Eq. 47), 'forced' (E-F, Eq. 66)
    group_norm: bool            # GN-RMS before both residual convs and in the output block (Eq. 29)
    pixel_norm: bool            # PixNorm on the encoder main path, start of every encoder block (F)
    resample_on_main_path: bool  # F: resample once on the main path, encoder 1x1 conv first;
    #                              C-E: resample in the residual branch and again on the skip path
    embedding_layers: int       # fully connected layers on the noise features: 2 (C-E) or 1 (F)
    output_block: str           # 'norm_silu_conv' (C-E) or 'conv' (F)


RUNGS: dict[str, Rung] = {
    "C": Rung("C", weight_norm="none", group_norm=True, pixel_norm=False, resample_on_main_path=False,
              embedding_layers=2, output_block="norm_silu_conv"),
    "D": Rung("D", weight_norm="standard", group_norm=True, pixel_norm=False, resample_on_main_path=False,
              embedding_layers=2, output_block="norm_silu_conv"),
    "E": Rung("E", weight_norm="forced", group_norm=True, pixel_norm=False, resample_on_main_path=False,
              embedding_layers=2, output_block="norm_silu_conv"),
    "F": Rung("F", weight_norm="forced", group_norm=False, pixel_norm=True, resample_on_main_path=True,
              embedding_layers=1, output_block="conv"),
}


def get_rung(config: str) -> Rung:
    if config not in RUNGS:
        raise EDM2Error(f"config={config!r} is not built by LadderPrecond; allowed: {', '.join(RUNGS)}")
    return RUNGS[config]


# ---------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------

class LadderConv(torch.nn.Module):
    """Convolution or fully connected layer without bias, with no weight
    normalisation (C) or standard weight normalisation (D).

    'none': the weight is used as stored; initialised like every other layer of
    configs A-B, uniform in +-1/sqrt(fan_in) (App. B.3: "the same uniform
    initialization as the rest of the layers").
    'standard': w_i / ||w_i|| on every use, inside autograd (Eq. 47), so the
    gradient is orthogonal to w_i (Eq. 59); initialised N(0, 1) (App. B.4).
    Computed as normalize(w) / sqrt(fan_in), the same arithmetic as MPConv.
    Configs E-F use `MPConv` itself (forced + standard weight normalisation).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=(), weight_norm: str = "none"):
        super().__init__()
        if weight_norm not in ("none", "standard"):
            raise EDM2Error(f"weight_norm={weight_norm!r}; allowed: 'none', 'standard' (forced: use MPConv)")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight_norm = weight_norm
        fan_in = in_channels * math.prod(kernel)
        if weight_norm == "none":
            bound = 1 / math.sqrt(fan_in)
            self.weight = torch.nn.Parameter(torch.empty(out_channels, in_channels, *kernel).uniform_(-bound, bound))
        else:
            self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.weight_norm == "standard":
            w = normalize(w) / np.sqrt(w[0].numel())  # Eq. 47: unit norm per output channel
        return apply_weight(x, w)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={list(self.weight.shape[2:])}, " \
               f"weight_norm={self.weight_norm!r}"


def make_conv(in_channels: int, out_channels: int, kernel, weight_norm: str) -> torch.nn.Module:
    """The learned layer of a rung: LadderConv for 'none'/'standard', MPConv for 'forced'."""
    if weight_norm == "forced":
        return MPConv(in_channels, out_channels, kernel=kernel)
    return LadderConv(in_channels, out_channels, kernel=kernel, weight_norm=weight_norm)


class Fourier(MPFourier):
    """Fourier features cos(2 pi (f a + phi)), f ~ N(0, 1), phi ~ U(0, 1), frozen
    (Eqs. 35-36). Config G's MP-Fourier is this times sqrt(2) (Eq. 75)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / np.sqrt(2)


def group_rms_norm(x: torch.Tensor, num_groups: int, eps: float = 1e-4) -> torch.Tensor:
    """Group normalisation without mean subtraction or learned scale (Eq. 29):
    b = a / sqrt(mean over the group of a^2 + eps). The statistics are computed
    in float32, the scaling in x's dtype."""
    n = x.shape[0]
    a = x.reshape(n, num_groups, -1)
    scale = torch.rsqrt(a.to(torch.float32).square().mean(dim=2, keepdim=True) + eps)
    return (a * scale.to(x.dtype)).reshape(x.shape)


def num_groups_for(channels: int) -> int:
    """32 groups, at least 4 channels per group (EDM's GroupNorm, which configs A-E share)."""
    return max(1, min(32, channels // 4))


# ---------------------------------------------------------------------------
# Block, U-Net, preconditioning.
# ---------------------------------------------------------------------------

class LadderBlock(torch.nn.Module):
    """Residual U-Net block of configs C-F (Figs. 18-21).

    C-E (resample_on_main_path off, as in ADM):
        y = conv_res0(R(silu(GN(x))));  y = silu(GN(y) * (1 + emb_linear(e)))
        y = conv_res1(dropout(y));       x = conv_skip?(R(x)) + y
    F (resample_on_main_path on):
        x = R(x);  enc: x = PixNorm(conv_skip?(x))
        y = conv_res0(silu(x));          y = silu(y * (1 + emb_linear(e)))
        y = conv_res1(dropout(y));       dec: x = conv_skip?(x);   x = x + y
    then, with attention, x = x + attn_proj(cosine attention(attn_qkv(x))),
    and a clip to [-clip_act, clip_act] (App. D.2).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, rung: Rung, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.1, clip_act: float | None = 256):
        super().__init__()
        check_block(flavor, resample_mode)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rung = rung
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.clip_act = clip_act
        wn = rung.weight_norm
        # F: the encoder's 1x1 conv runs first, so the first residual conv is out -> out.
        res0_in = out_channels if (rung.resample_on_main_path and flavor == "enc") else in_channels
        self.conv_res0 = make_conv(res0_in, out_channels, [3, 3], wn)
        self.emb_linear = make_conv(emb_channels, out_channels, [], wn)
        self.conv_res1 = make_conv(out_channels, out_channels, [3, 3], wn)
        self.conv_skip = make_conv(in_channels, out_channels, [1, 1], wn) if in_channels != out_channels else None
        self.attn_qkv = make_conv(out_channels, out_channels * 3, [1, 1], wn) if self.num_heads else None
        self.attn_proj = make_conv(out_channels, out_channels, [1, 1], wn) if self.num_heads else None

    # Cosine attention (App. B.3, Eqs. 30-34) is config G's, joined here by a plain sum.
    attention = Block.attention

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return group_rms_norm(x, num_groups_for(x.shape[1])) if self.rung.group_norm else x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        main = self.rung.resample_on_main_path
        if main:
            x = resample(x, self.resample_mode)
            if self.flavor == "enc":
                if self.conv_skip is not None:
                    x = self.conv_skip(x)
                if self.rung.pixel_norm:
                    x = normalize(x, dim=1)  # PixNorm (Eq. 30)

        y = F.silu(self._norm(x))
        if not main:
            y = resample(y, self.resample_mode)
        y = self.conv_res0(y)
        c = self.emb_linear(emb) + 1  # scale-only conditioning, in float32
        y = F.silu(self._norm(y) * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if not main:
            x = resample(x, self.resample_mode)
        if self.conv_skip is not None and (not main or self.flavor == "dec"):
            x = self.conv_skip(x)
        x = x + y

        if self.num_heads:
            x = x + self.attention(x)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class LadderUNet(torch.nn.Module):
    """The U-Net of configs C-F: the layout of `edm2.nn.UNet` (same module names,
    same levels, skips and attention placement) with the rung's switches."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, config: str = "E",
                 model_channels: int = 192, channel_mult=(1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions=(16, 8), **block_kwargs):
        super().__init__()
        check_architecture(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks)
        rung = get_rung(config)
        self.rung = rung
        wn = rung.weight_norm
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_dim = label_dim

        # Embedding (App. B.3; F: one layer fewer, App. B.6).
        self.emb_fourier = Fourier(cnoise)
        self.emb_noise = make_conv(cnoise, cemb, [], wn)
        self.emb_hidden = make_conv(cemb, cemb, [], wn) if rung.embedding_layers == 2 else None
        self.emb_label = make_conv(label_dim, cemb, [], wn) if label_dim else None

        # Encoder and decoder; the constant-1 input channel (App. B.3).
        enc, dec = unet_layout(img_resolution, img_channels + 1, cblock, num_blocks, attn_resolutions)
        self.enc = torch.nn.ModuleDict()
        for name, cin, cout, kw in enc:
            self.enc[name] = make_conv(cin, cout, [3, 3], wn) if kw is None else \
                LadderBlock(cin, cout, cemb, rung, flavor="enc", **kw, **block_kwargs)
        self.dec = torch.nn.ModuleDict()
        for name, cin, cout, kw in dec:
            self.dec[name] = LadderBlock(cin, cout, cemb, rung, flavor="dec", **kw, **block_kwargs)
        self.out_conv = make_conv(cout, img_channels, [3, 3], wn)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        # Embedding, in float32.
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_hidden is not None:
            emb = self.emb_hidden(F.silu(emb))
        if self.emb_label is not None:
            emb = emb + self.emb_label(class_labels * np.sqrt(class_labels.shape[1]))  # one-hot x sqrt(N)
        emb = F.silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        x = unet_encode_decode(self.enc, self.dec, x, emb, join=lambda a, b: torch.cat([a, b], dim=1))

        if self.rung.output_block == "norm_silu_conv":
            x = F.silu(group_rms_norm(x, num_groups_for(x.shape[1])))
        return self.out_conv(x)


class LadderPrecond(Denoiser):
    """EDM preconditioning and the uncertainty u(sigma) around a config C-F U-Net.

    Same constructor arguments and forward signature as `edm2.nn.Precond`, plus
    `config`. u(sigma) is a one-layer MLP over Fourier features of c_noise with
    the rung's weight normalisation and no bias (App. B.2-B.3).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, config: str = "E",
                 precision: str = "fp16", sigma_data: float = 0.5, logvar_channels: int = 128, **unet_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, precision=precision, sigma_data=sigma_data)
        check_dropout("dropout", unet_kwargs.get("dropout", 0.1))
        rung = get_rung(config)
        self.config = rung.name
        self.unet = LadderUNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                               config=rung.name, **unet_kwargs)
        self.logvar_fourier = Fourier(logvar_channels)
        self.logvar_linear = make_conv(logvar_channels, 1, [], rung.weight_norm)
