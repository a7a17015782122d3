"""Configs A and B of the paper's ablation (Table 1): the ADM U-Net of
Dhariwal & Nichol as re-implemented in EDM, with EDM's preconditioning.

Config A (paper Sec. 2, App. B.1, Fig. 16) is the starting point of the
ablation: a standard U-Net with GroupNorm, adaptive GroupNorm conditioning,
additive biases, dot-product self-attention at 32x32, 16x16 and 8x8, and
zero-initialised output layers of every residual branch. Config B (paper
Sec. 2.1, App. B.2, Fig. 17) is the same network without the 32x32
attention, trained with the learned uncertainty u(sigma) of Eq. 21; this
module builds it with ``attn_resolutions=(16, 8), uncertainty=True``.

Parameter names, shapes, creation order and initialisation follow EDM's
``EDMPrecond(DhariwalUNet)`` (Karras et al. 2022), so that a state dict of
config A has exactly the keys of an EDM ADM checkpoint and a seeded build
draws the same weights. See docs/ablation.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..utils.errors import EDM2Error
from .denoiser import Denoiser, check_dropout, check_sigma_data
from .layers import resample
from .unet import check_architecture, unet_encode_decode, unet_layout


def _init(shape, fan_in: int, scale: float, normal: bool = False) -> torch.Tensor:
    """He-uniform U(+-sqrt(3 / fan_in)), or He-normal N(0, 1 / fan_in) when
    `normal`, times `scale` (App. B.1).

    With scale sqrt(1/3) the uniform case is U(+-1/sqrt(fan_in)), PyTorch's
    default for convolutions and linear layers. A scale of 0 still draws the
    random numbers, so that the layers created afterwards get the same values
    as in a network where this layer is not zero-initialised (seeded parity
    with EDM's code).
    """
    if normal:
        return (math.sqrt(1 / fan_in) * torch.randn(*shape)) * scale
    return (math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)) * scale


_INIT = math.sqrt(1 / 3)  # weights and biases: U(+-1/sqrt(fan_in))
_ZERO = 0.0  # the last layer of every residual branch (App. B.1)


class Linear(torch.nn.Module):
    """Fully connected layer y = x W^T + b with He-uniform initialisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale: float = _INIT,
                 normal: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.nn.Parameter(_init([out_features, in_features], in_features, scale, normal))
        self.bias = torch.nn.Parameter(_init([out_features], in_features, scale, normal)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


class Conv2d(torch.nn.Module):
    """Resampling (2x2 box filter: average down / nearest up) followed by an
    optional k x k convolution with bias (`kernel` 0: resampling only).

    Resampling layers hold the normalised 2x2 box filter as the buffer
    `resample_filter`, as in EDM's checkpoints; the resampling itself is
    `edm2.nn.resample` with filter [1, 1], which computes the same thing.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 resample_mode: str = "keep", scale: float = _INIT):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resample_mode = resample_mode
        fan_in = in_channels * kernel * kernel
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = torch.nn.Parameter(_init(shape, fan_in, scale)) if kernel else None
        self.bias = torch.nn.Parameter(_init([out_channels], fan_in, scale)) if kernel and bias else None
        if resample_mode != "keep":
            self.register_buffer("resample_filter", torch.full([1, 1, 2, 2], 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.weight is not None:
            x = F.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    """GroupNorm with learned scale and bias; min(32, C/4) groups, eps 1e-5."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(32, num_channels // 4)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def _groups_ok(channels: int) -> bool:
    return channels >= 4 and channels % min(32, channels // 4) == 0


class ADMBlock(torch.nn.Module):
    """Residual block of the ADM U-Net (App. B.1, Fig. 16):

        h = Conv0(R(SiLU(GN0(x))));  (s, t) = Affine(emb)
        h = Conv1(Dropout(SiLU(GN1(h) * (1 + s) + t)))      (Conv1 zero-init)
        x = h + Skip(x)           Skip = R, then a 1x1 conv if the width changes
        x = x + Proj(Attention(QKV(GN2(x))))                 (Proj zero-init)

    R is the block's optional 2x resampling; `clip_act` clamps the output.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, resample_mode: str = "keep",
                 attention: bool = False, channels_per_head: int = 64, dropout: float = 0.0,
                 clip_act: float | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.clip_act = clip_act
        # Creation order matters: it fixes which random numbers each layer draws.
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, resample_mode=resample_mode)
        self.affine = Linear(emb_channels, 2 * out_channels)
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3, scale=_ZERO)
        self.skip = None
        if in_channels != out_channels or resample_mode != "keep":
            self.skip = Conv2d(in_channels, out_channels, 1 if in_channels != out_channels else 0,
                               resample_mode=resample_mode)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = Conv2d(out_channels, out_channels, 1, scale=_ZERO)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        # Adaptive GroupNorm: the embedding gives a per-channel scale and shift.
        scale, shift = self.affine(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = h + (self.skip(x) if self.skip is not None else x)
        if self.num_heads:
            x = x + self.proj(self.attention(self.norm2(x)))
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head dot-product self-attention, softmax(q^T k / sqrt(N_c)) with
        the logits and the softmax in float32 (App. B.1; D.2 keeps attention
        out of fp16)."""
        n, c, h, w = x.shape
        ch = c // self.num_heads
        # qkv channel (head * ch + i) * 3 + s holds q (s=0), k (s=1), v (s=2) of channel i of a head.
        q, k, v = self.qkv(x).reshape(n * self.num_heads, ch, 3, h * w).unbind(2)
        logits = torch.bmm(q.transpose(1, 2).to(torch.float32), (k / math.sqrt(ch)).to(torch.float32))
        weights = logits.softmax(dim=2).to(q.dtype)  # [N*heads, queries, keys]
        y = torch.bmm(v, weights.transpose(1, 2))  # [N*heads, ch, queries]
        return y.reshape(n, c, h, w)


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding of the noise level: [cos(a f_j), sin(a f_j)] with
    f_j = (1/10000)^(j / (C/2)), j = 0 ... C/2 - 1 (App. B.1). No parameters."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=torch.float32, device=x.device) / half)
        a = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([a.cos(), a.sin()], dim=1)


class FourierFeatures(torch.nn.Module):
    """Random Fourier features cos(2 pi (f_i a + phi_i)), f ~ N(0, 1),
    phi ~ U(0, 1), frozen at initialisation (App. B.3, Eqs. 35-36).

    Stored like `edm2.nn.MPFourier` (buffers `freqs` = 2 pi f, `phases` =
    2 pi phi, created in that order) but without its sqrt(2) factor: the
    output has RMS 1/sqrt(2).
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return y.cos().to(x.dtype)


class ADMUNet(torch.nn.Module):
    """The ADM U-Net F(x, c_noise, labels) of config A (App. B.1, Fig. 16).

    Embedding: e = SiLU(W2 SiLU(W1 PosEmb(c_noise) + b1) + b2 + Wc onehot),
    with Wc ~ N(0, 1) and no bias. Encoder: input conv, then per level a 2x
    downsampling block (below the top level) and `num_blocks` blocks;
    decoder: two blocks at the lowest resolution (the first with attention),
    an upsampling block per higher level, and `num_blocks + 1` blocks per
    level that each take one encoder output by concatenation. Output:
    GroupNorm, SiLU, zero-initialised 3x3 conv.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 model_channels: int = 192, channel_mult=(1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions=(32, 16, 8), dropout: float = 0.10,
                 channels_per_head: int = 64, clip_act: float | None = None):
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=channels_per_head, dropout=dropout,
                            clip_act=clip_act)
        self.label_dim = label_dim

        # Embedding (creation order as in EDM: the class embedding comes last).
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        # Class embedding: no bias, N(0, 1) weights (drawn as N(0, 1/fan_in) * sqrt(fan_in)).
        self.map_label = Linear(label_dim, emb_channels, bias=False, scale=math.sqrt(label_dim),
                                normal=True) if label_dim else None

        # Encoder and decoder.
        widths = [model_channels * mult for mult in channel_mult]
        enc, dec = unet_layout(img_resolution, in_channels, widths, num_blocks, attn_resolutions)
        self.enc = torch.nn.ModuleDict()
        for name, cin, cout, kw in enc:
            self.enc[name] = Conv2d(cin, cout, 3) if kw is None else ADMBlock(cin, cout, **kw, **block_kwargs)
        self.dec = torch.nn.ModuleDict()
        for name, cin, cout, kw in dec:
            self.dec[name] = ADMBlock(cin, cout, **kw, **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, scale=_ZERO)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.map_layer1(F.silu(self.map_layer0(self.map_noise(noise_labels))))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        emb = F.silu(emb)

        x = unet_encode_decode(self.enc, self.dec, x, emb, join=lambda a, b: torch.cat([a, b], dim=1))
        return self.out_conv(F.silu(self.out_norm(x)))


class ADMPrecond(Denoiser):
    """Denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, labels) around
    the ADM U-Net: config A of the paper's Table 1 by default, config B with
    ``attn_resolutions=(16, 8), uncertainty=True``.

    With `uncertainty`, the module also holds the learned uncertainty u(sigma)
    of Eq. 21 (App. B.2): `logvar_channels` random Fourier features of c_noise
    into one fully connected layer with bias; ``return_logvar=True`` then
    returns (D, u) with u of shape [N, 1, 1, 1], as `edm2.nn.Precond` does.

    `precision` ('fp32', 'fp16' or 'bf16') is the dtype of the U-Net's
    activations on CUDA; the embedding, the attention softmax and everything
    on the CPU run in float32. `clip_act` clamps every block's output to
    [-clip_act, clip_act] (None: no clamp, as in EDM).
    """

    backbone = "model"  # EDM's name for the U-Net (its checkpoints' keys)

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult=(1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions=(32, 16, 8),
        dropout: float = 0.10,
        channels_per_head: int = 64,
        sigma_data: float = 0.5,
        uncertainty: bool = False,
        logvar_channels: int = 128,
        precision: str = "fp16",
        clip_act: float | None = None,
    ):
        channel_mult = tuple(channel_mult)
        attn_resolutions = tuple(attn_resolutions)
        _check_arguments(img_resolution, img_channels, label_dim, model_channels, channel_mult, channel_mult_emb,
                         num_blocks, attn_resolutions, dropout, channels_per_head, sigma_data, logvar_channels,
                         clip_act)
        super().__init__(img_resolution, img_channels, label_dim, precision=precision, sigma_data=sigma_data)
        self.uncertainty = bool(uncertainty)
        self.attn_resolutions = attn_resolutions
        self.model = ADMUNet(img_resolution, img_channels, img_channels, label_dim=label_dim,
                             model_channels=model_channels, channel_mult=channel_mult,
                             channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
                             attn_resolutions=attn_resolutions, dropout=dropout,
                             channels_per_head=channels_per_head, clip_act=clip_act)
        if self.uncertainty:
            self.logvar_fourier = FourierFeatures(logvar_channels)
            self.logvar_linear = Linear(logvar_channels, 1)

    @property
    def config(self) -> str:
        """'B' when the network has the learned uncertainty u(sigma), else 'A'."""
        return "B" if self.uncertainty else "A"

    def forward(self, x, sigma, class_labels=None, force_fp32: bool = False, return_logvar: bool = False):
        if return_logvar and not self.uncertainty:
            raise EDM2Error("return_logvar=True: this config-A network has no learned uncertainty u(sigma); "
                             "train it with edm2.loss.EDMLoss, or build it with uncertainty=True (config B)")
        return super().forward(x, sigma, class_labels, force_fp32, return_logvar)


def adm_channels_per_head(img_resolution: int, model_channels: int, channel_mult, attn_resolutions,
                          preferred: int) -> int:
    """The channels per attention head of an ADM network at a size preset.

    The ADM attention splits a block's width into heads of equal size, so the
    head width must divide the width of every block with attention (the levels
    in `attn_resolutions` and the bottleneck). EDM's code fixes 64 channels per
    head, which suits its widths (multiples of 192); a size preset's own
    `preferred` width is kept when it divides all of them. Otherwise the
    smallest common divisor >= `preferred` is taken (no more heads than the
    EDM2 network of the same preset has, where a head is
    `width // channels_per_head` wide), or, if there is none, the greatest
    common divisor of the widths. E.g. cpu-32 (widths 48 with attention,
    preferred 32): 48, one head, like config G at cpu-32.
    """
    resolutions = [img_resolution >> i for i in range(len(channel_mult))]
    widths = [model_channels * m for level, m in enumerate(channel_mult)
              if resolutions[level] in attn_resolutions or level == len(channel_mult) - 1]
    if all(w % preferred == 0 for w in widths):
        return preferred
    common = math.gcd(*widths)
    bigger = [d for d in range(preferred, common + 1) if common % d == 0]
    return bigger[0] if bigger else common


def adm_net_kwargs(net_kwargs: dict) -> dict:
    """`net_kwargs` of a size preset (`edm2.presets.Preset.net_kwargs`) made
    fit for the ADM network of configs A and B: `attn_resolutions` lists only
    resolutions the network has, and `channels_per_head` divides every width
    with attention (`adm_channels_per_head`). A new dict."""
    kw = dict(net_kwargs)
    levels = [kw["img_resolution"] >> i for i in range(len(kw["channel_mult"]))]
    kw["attn_resolutions"] = [r for r in kw["attn_resolutions"] if r in levels]
    kw["channels_per_head"] = adm_channels_per_head(kw["img_resolution"], kw["model_channels"], kw["channel_mult"],
                                                    kw["attn_resolutions"], kw.get("channels_per_head", 64))
    return kw


def _check_arguments(img_resolution, img_channels, label_dim, model_channels, channel_mult, channel_mult_emb,
                     num_blocks, attn_resolutions, dropout, channels_per_head, sigma_data, logvar_channels,
                     clip_act) -> None:
    """`EDM2Error` naming the bad argument and what is allowed (the precision: `Denoiser`)."""
    check_architecture(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks)
    for m in channel_mult:
        if not _groups_ok(model_channels * m):
            raise EDM2Error(f"model_channels={model_channels} with channel_mult {list(channel_mult)}: every width "
                             f"must be >= 4 and divisible by its GroupNorm group count min(32, width // 4), "
                             f"e.g. a multiple of 32 (got width {model_channels * m})")
    if not isinstance(channel_mult_emb, int) or channel_mult_emb < 1:
        raise EDM2Error(f"channel_mult_emb={channel_mult_emb!r}: must be a positive integer")
    if not isinstance(channels_per_head, int) or channels_per_head < 1:
        raise EDM2Error(f"channels_per_head={channels_per_head!r}: must be a positive integer")
    resolutions = [img_resolution >> i for i in range(len(channel_mult))]
    for r in attn_resolutions:
        if r not in resolutions:
            raise EDM2Error(f"attn_resolutions={list(attn_resolutions)}: {r} is not one of the network's "
                             f"resolutions {resolutions}; list the ones that get self-attention")
    for level, m in enumerate(channel_mult):
        c = model_channels * m
        if c % channels_per_head and c // channels_per_head and (
                resolutions[level] in attn_resolutions or level == len(channel_mult) - 1):
            raise EDM2Error(f"channels_per_head={channels_per_head}: width {c} at {resolutions[level]}x"
                             f"{resolutions[level]} is not a multiple of it")
    check_dropout("dropout", dropout)
    check_sigma_data("sigma_data", sigma_data)
    if not isinstance(logvar_channels, int) or logvar_channels < 1:
        raise EDM2Error(f"logvar_channels={logvar_channels!r}: must be a positive integer")
    if clip_act is not None and not clip_act > 0:
        raise EDM2Error(f"clip_act={clip_act!r}: must be positive, or None for no clamp")
