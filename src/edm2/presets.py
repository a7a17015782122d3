"""Training presets: the paper's ImageNet recipes (SPEC §6) and small ones.

A preset is plain data. `Preset.net_kwargs(label_dim)` gives the keyword
arguments of `edm2.nn.Precond`; the training fields feed the trainer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["Preset", "PRESETS", "get_preset", "preset_names"]

Ki, Mi, Gi = 2 ** 10, 2 ** 20, 2 ** 30


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    # Data the preset is made for.
    img_resolution: int
    img_channels: int
    latent: bool                      # True: SD-VAE latents (SPEC §9); False: pixels
    # Architecture (U-Net arguments; everything else at SPEC §3 defaults).
    model_channels: int
    channel_mult: tuple = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: tuple = (16, 8)
    dropout: float = 0.0
    channels_per_head: int = 64
    # Optimisation (SPEC §5).
    lr: float = 0.0100                # ref_lr
    decay: float = 70000              # ref_batches
    rampup_Mimg: float = 10           # learning-rate warm-up, decimal millions of images
    P_mean: float = -0.4
    P_std: float = 1.0
    batch: int = 2048
    duration: int = 2048 * Mi         # training images
    # Intervals, in training images.
    status: int = 128 * Ki
    snapshot: int = 8 * Mi
    checkpoint: int = 128 * Mi
    ema_std: tuple = (0.050, 0.100)

    def net_kwargs(self, label_dim: int) -> dict:
        """Keyword arguments of `Precond` for this preset."""
        return dict(
            img_resolution=self.img_resolution,
            img_channels=self.img_channels,
            label_dim=label_dim,
            model_channels=self.model_channels,
            channel_mult=list(self.channel_mult),
            num_blocks=self.num_blocks,
            attn_resolutions=list(self.attn_resolutions),
            dropout=self.dropout,
            channels_per_head=self.channels_per_head,
        )

    def replace(self, **changes) -> "Preset":
        return dataclasses.replace(self, **changes)


def _imagenet(name, res, ch, channels, lr, decay, dropout, P_mean, P_std, duration, latent):
    kind = "ImageNet-512 latents (64x64x4)" if latent else "ImageNet-64 pixels"
    return Preset(
        name=name, description=f"paper recipe, {kind}", img_resolution=res, img_channels=ch, latent=latent,
        model_channels=channels, lr=lr, decay=decay, dropout=dropout, P_mean=P_mean, P_std=P_std,
        duration=duration)


_PAPER = [
    # name,        channels, lr,     decay, dropout, P_mean, P_std, duration
    ("img512-xxs", 64,  0.0170, 70000, 0.00, -0.4, 1.0, 2048 * Mi),
    ("img512-xs",  128, 0.0120, 70000, 0.00, -0.4, 1.0, 2048 * Mi),
    ("img512-s",   192, 0.0100, 70000, 0.00, -0.4, 1.0, 2048 * Mi),
    ("img512-m",   256, 0.0090, 70000, 0.10, -0.4, 1.0, 2048 * Mi),
    ("img512-l",   320, 0.0080, 70000, 0.10, -0.4, 1.0, 1792 * Mi),
    ("img512-xl",  384, 0.0070, 70000, 0.10, -0.4, 1.0, 1280 * Mi),
    ("img512-xxl", 448, 0.0065, 70000, 0.10, -0.4, 1.0, 896 * Mi),
    ("img64-xs",   128, 0.0120, 35000, 0.00, -0.8, 1.6, 1024 * Mi),
    ("img64-s",    192, 0.0100, 35000, 0.00, -0.8, 1.6, 1024 * Mi),
    ("img64-m",    256, 0.0090, 35000, 0.10, -0.8, 1.6, 2048 * Mi),
    ("img64-l",    320, 0.0080, 35000, 0.10, -0.8, 1.6, 1024 * Mi),
    ("img64-xl",   384, 0.0070, 35000, 0.10, -0.8, 1.6, 640 * Mi),
]

PRESETS: dict[str, Preset] = {}
for _n, _c, _lr, _d, _do, _pm, _ps, _dur in _PAPER:
    _latent = _n.startswith("img512")
    PRESETS[_n] = _imagenet(_n, 64, 4 if _latent else 3, _c, _lr, _d, _do, _pm, _ps, _dur, _latent)

# Small presets of our own, for CPUs and small data sets (README: "Presets").
PRESETS["cpu-32"] = Preset(
    name="cpu-32",
    description="32x32 grey or RGB on a laptop CPU (the Fashion-MNIST demo)",
    img_resolution=32, img_channels=1, latent=False,
    model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,), channels_per_head=32,
    lr=0.0100, decay=2000, rampup_Mimg=0.002, P_mean=-0.8, P_std=1.6,
    batch=64, duration=32 * Ki, status=2 * Ki, snapshot=8 * Ki, checkpoint=8 * Ki)
PRESETS["tiny"] = Preset(
    name="tiny",
    description="smallest sensible network, for tests and smoke runs",
    img_resolution=16, img_channels=1, latent=False,
    model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), channels_per_head=16,
    lr=0.0100, decay=100, rampup_Mimg=0.0001, P_mean=-0.8, P_std=1.6,
    batch=8, duration=64, status=16, snapshot=32, checkpoint=32)


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """Look up a preset; the reference's `edm2-` prefix is accepted too."""
    key = name[len("edm2-"):] if name.startswith("edm2-") else name
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)} (an 'edm2-' prefix is accepted)")
    return PRESETS[key]


# ---------------------------------------------------------------------------
# Generation presets of the authors' published models (net, gnet, guidance).
# Filled in by the import-official work (issue 8).
# ---------------------------------------------------------------------------
