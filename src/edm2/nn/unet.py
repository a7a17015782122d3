"""The EDM2 U-Net (config G of the paper, Fig. 22) and its EDM preconditioning.

Module and parameter names follow the authors' code exactly so that the state dict
of `Precond` matches the authors' published checkpoints key for key.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.errors import EDM2Error
from .denoiser import Denoiser, check_dropout
from .hub import HubMixin
from .layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample


class Block(torch.nn.Module):
    """Residual U-Net block, encoder or decoder flavour (paper Fig. 22)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter=(1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ):
        super().__init__()
        check_block(flavor, resample_mode)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.resample_filter = list(resample_filter)
        # As in the reference, a block narrower than one head gets no attention.
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        # Creation order matters for seeded initialisation parity (docs/design.md#block).
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode, self.resample_filter)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm (Eq. 30)

        # Residual branch, modulated by the embedding (gain starts at 0).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self.attention(x), t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine attention: q, k, v normalised per head (paper App. B.3, Eqs. 30-34), via SDPA."""
        n, c, h, w = x.shape
        ch = c // self.num_heads
        qkv = self.attn_qkv(x).reshape(n, self.num_heads, ch, 3, h * w)
        q, k, v = normalize(qkv, dim=2).unbind(3)  # each [N, heads, ch, HW]
        y = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
        y = y.transpose(2, 3).reshape(n, c, h, w)
        return self.attn_proj(y)


class UNet(torch.nn.Module):
    """EDM2 U-Net F(x, c_noise, labels) (paper Fig. 22, config G)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult=(1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions=(16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        **block_kwargs,
    ):
        super().__init__()
        check_architecture(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks)
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding of noise level and class label.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        # Encoder and decoder.
        enc, dec = unet_layout(img_resolution, img_channels + 1, cblock, num_blocks, attn_resolutions)
        self.enc = torch.nn.ModuleDict()
        for name, cin, cout, kw in enc:
            self.enc[name] = MPConv(cin, cout, kernel=[3, 3]) if kw is None else \
                Block(cin, cout, cemb, flavor="enc", **kw, **block_kwargs)
        self.dec = torch.nn.ModuleDict()
        for name, cin, cout, kw in dec:
            self.dec[name] = Block(cin, cout, cemb, flavor="dec", **kw, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        # Embedding (runs in float32 whatever the dtype of x).
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)   # the constant input channel (App. B.3)
        x = unet_encode_decode(self.enc, self.dec, x, emb, join=lambda a, b: mp_cat(a, b, t=self.concat_balance))
        return self.out_conv(x, gain=self.out_gain)


class Precond(Denoiser, HubMixin):
    """EDM preconditioning D(x; sigma) around the U-Net, plus the learned
    uncertainty u(sigma) used by the loss (paper App. B.1 Eqs. 4-8, App. B.2 Eq. 21).

    `precision` is the dtype the U-Net runs in when the input is on CUDA:
    'fp16' (as the reference), 'bf16' or 'fp32'; on the CPU it always runs in
    float32. `use_fp16` is the authors' name for the choice fp16/fp32, accepted
    so that their stored constructor arguments build our network.

    `save_pretrained(dir)` / `Precond.from_pretrained(dir_or_repo_id)` follow the
    Hugging Face Hub conventions (edm2.nn.hub.HubMixin; docs/integrations.md).
    """

    _hub_config_classes = (UNet, Block)
    config = "G"  # the row of the paper's Table 1 (edm2.nn.build_network)

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        precision: str = "fp16",
        sigma_data: float = 0.5,
        logvar_channels: int = 128,
        use_fp16: bool | None = None,
        **unet_kwargs,
    ):
        if use_fp16 is not None:
            precision = "fp16" if use_fp16 else "fp32"
        super().__init__(img_resolution, img_channels, label_dim, precision=precision, sigma_data=sigma_data)
        check_dropout("dropout", unet_kwargs.get("dropout", 0))
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])


def check_architecture(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks) -> None:
    """The U-Net arguments every config shares: `EDM2Error` naming the bad argument and what is allowed."""
    r = img_resolution
    if not isinstance(r, int) or r < 8 or r & (r - 1):
        raise EDM2Error(f"img_resolution={r!r}: must be a power of two >= 8 (8, 16, 32, 64, ...)")
    if not isinstance(img_channels, int) or img_channels < 1:
        raise EDM2Error(f"img_channels={img_channels!r}: must be a positive integer (1 grey, 3 RGB, 4 latent, ...)")
    if not isinstance(label_dim, int) or label_dim < 0:
        raise EDM2Error(f"label_dim={label_dim!r}: must be an integer >= 0 (0 = unconditional)")
    if not isinstance(model_channels, int) or model_channels < 1:
        raise EDM2Error(f"model_channels={model_channels!r}: must be a positive integer")
    if len(channel_mult) == 0 or any((not isinstance(m, int)) or m < 1 for m in channel_mult):
        raise EDM2Error(f"channel_mult={list(channel_mult)!r}: must be a non-empty list of positive integers, "
                         f"e.g. [1, 2, 3, 4]")
    if (r >> (len(channel_mult) - 1)) < 1:
        raise EDM2Error(f"channel_mult has {len(channel_mult)} levels, too many for img_resolution={r} "
                         f"(at most {r.bit_length()})")
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise EDM2Error(f"num_blocks={num_blocks!r}: must be an integer >= 1")


def check_block(flavor: str, resample_mode: str) -> None:
    """A block's kind (every config's U-Net): `EDM2Error` naming the bad argument and what is allowed."""
    if flavor not in ("enc", "dec"):
        raise EDM2Error(f"flavor={flavor!r}; allowed: 'enc', 'dec'")
    if resample_mode not in ("keep", "up", "down"):
        raise EDM2Error(f"resample_mode={resample_mode!r}; allowed: 'keep', 'up', 'down'")


def unet_encode_decode(enc, dec, x: torch.Tensor, emb: torch.Tensor, join) -> torch.Tensor:
    """The forward pass through the modules of `unet_layout`, shared by every config:
    every encoder output goes on the skip stack (the input conv takes no embedding),
    and each decoder `_block` module first joins the newest skip, `join(x, skip)`
    (MP-Cat, Eq. 103, in config G; plain concatenation in A-F)."""
    skips = []
    for name, block in enc.items():
        x = block(x) if name.endswith("_conv") else block(x, emb)
        skips.append(x)
    for name, block in dec.items():
        if "_block" in name:
            x = join(x, skips.pop())
        x = block(x, emb)
    return x


def unet_layout(img_resolution: int, in_channels: int, widths, num_blocks: int, attn_resolutions):
    """The layout of every config's U-Net (paper Figs. 16-22; the authors' module names).

    Returns (encoder, decoder), each a list of (name, in_channels,
    out_channels, kwargs) in creation order. The encoder: an input conv at the
    top level (kwargs None), then per level a 2x downsampling block
    (`resample_mode='down'`, below the top) and `num_blocks` blocks; the
    decoder: two blocks at the lowest resolution (`_in0` with attention), an
    upsampling block per higher level, and `num_blocks + 1` blocks per level,
    each taking one encoder output as a skip (counted in its in_channels).
    Blocks at a resolution in `attn_resolutions` get `attention=True`.
    `widths` are the channels of each level, top first.
    """
    enc, dec = [], []
    cout = in_channels
    for level, channels in enumerate(widths):
        res = img_resolution >> level
        if level == 0:
            cin, cout = cout, channels
            enc.append((f"{res}x{res}_conv", cin, cout, None))
        else:
            enc.append((f"{res}x{res}_down", cout, cout, dict(resample_mode="down")))
        for idx in range(num_blocks):
            cin, cout = cout, channels
            enc.append((f"{res}x{res}_block{idx}", cin, cout, dict(attention=res in attn_resolutions)))
    skips = [c for _, _, c, _ in enc]
    for level, channels in reversed(list(enumerate(widths))):
        res = img_resolution >> level
        if level == len(widths) - 1:
            dec.append((f"{res}x{res}_in0", cout, cout, dict(attention=True)))
            dec.append((f"{res}x{res}_in1", cout, cout, {}))
        else:
            dec.append((f"{res}x{res}_up", cout, cout, dict(resample_mode="up")))
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), channels
            dec.append((f"{res}x{res}_block{idx}", cin, cout, dict(attention=res in attn_resolutions)))
    return enc, dec
