"""Training presets: the paper's ImageNet recipes (Table 6) and small ones.

A preset is plain data. `Preset.net_kwargs(label_dim)` gives the keyword
arguments of `edm2.nn.Precond`; the training fields feed the trainer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["Preset", "PRESETS", "get_preset", "apply_generation_preset", "GenerationPreset", "GENERATION_PRESETS",
           "get_generation_preset", "format_generation_presets", "POSTHOC_URL"]

Ki, Mi, Gi = 2 ** 10, 2 ** 20, 2 ** 30


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    # Data the preset is made for.
    img_resolution: int
    img_channels: int
    latent: bool                      # True: SD-VAE latents (App. B.1); False: pixels
    # Architecture (U-Net arguments; everything else at the defaults of Figure 22).
    model_channels: int
    channel_mult: tuple = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: tuple = (16, 8)
    dropout: float = 0.0
    channels_per_head: int = 64
    # Optimisation (App. B.2, B.5, Eq. 67).
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
    # Narrow and shallow for ~8 min on 2 cores; batch 32: twice the steps of 64 per image, which
    # matters more than batch noise this early (README, "The CPU presets").
    model_channels=24, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,), channels_per_head=32,
    lr=0.0100, decay=2000, rampup_Mimg=0.002, P_mean=-0.8, P_std=1.6,
    batch=32, duration=16 * Ki, status=2 * Ki, snapshot=8 * Ki, checkpoint=8 * Ki)
PRESETS["tiny"] = Preset(
    name="tiny",
    description="smallest sensible network, for tests and smoke runs",
    img_resolution=16, img_channels=1, latent=False,
    model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), channels_per_head=16,
    lr=0.0100, decay=100, rampup_Mimg=0.0001, P_mean=-0.8, P_std=1.6,
    batch=8, duration=64, status=16, snapshot=32, checkpoint=32)


def get_preset(name: str) -> Preset:
    """Look up a preset; the reference's `edm2-` prefix is accepted too."""
    key = name[len("edm2-"):] if name.startswith("edm2-") else name
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)} (an 'edm2-' prefix is accepted)")
    return PRESETS[key]


# ---------------------------------------------------------------------------
# Generation presets of the authors' published models (net, gnet, guidance).
# Usage: docs/published-models.md.
# ---------------------------------------------------------------------------
# Facts taken from the authors' README / generate_images.py (preset name ->
# post-hoc reconstruction files and guidance weight; the metric each preset
# optimises and the value they report). `edm2 generate --preset NAME` resolves
# a preset through `get_generation_preset`; URLs are fetched into the download
# cache by edm2.official (docs/published-models.md).

# The authors' post-hoc reconstructions: edm2-img512-s-2147483-0.130.pkl, ...
POSTHOC_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"


@dataclass(frozen=True)
class GenerationPreset:
    """A published (net, gnet, guidance) triple. `gnet` is None without guidance."""
    name: str
    net: str                  # URL of the main network pickle
    gnet: str | None          # URL of the guiding network (unconditional: CFG; smaller/earlier: autoguidance)
    guidance: float           # guidance weight w (1 = none)
    metric: str               # 'fid' or 'fd_dinov2': what the EMA length and w were tuned for
    reported: float           # the authors' reported value of that metric


_GENERATION = [
    # name (without 'edm2-'),  net file,                      gnet file,                       w,    metric,      value
    ("img512-xs-fid",          "img512-xs-2147483-0.135",     None,                            1.00, "fid",       3.53),
    ("img512-xs-dino",         "img512-xs-2147483-0.200",     None,                            1.00, "fd_dinov2", 103.39),
    ("img512-s-fid",           "img512-s-2147483-0.130",      None,                            1.00, "fid",       2.56),
    ("img512-s-dino",          "img512-s-2147483-0.190",      None,                            1.00, "fd_dinov2", 68.64),
    ("img512-m-fid",           "img512-m-2147483-0.100",      None,                            1.00, "fid",       2.25),
    ("img512-m-dino",          "img512-m-2147483-0.155",      None,                            1.00, "fd_dinov2", 58.44),
    ("img512-l-fid",           "img512-l-1879048-0.085",      None,                            1.00, "fid",       2.06),
    ("img512-l-dino",          "img512-l-1879048-0.155",      None,                            1.00, "fd_dinov2", 52.25),
    ("img512-xl-fid",          "img512-xl-1342177-0.085",     None,                            1.00, "fid",       1.96),
    ("img512-xl-dino",         "img512-xl-1342177-0.155",     None,                            1.00, "fd_dinov2", 45.96),
    ("img512-xxl-fid",         "img512-xxl-0939524-0.070",    None,                            1.00, "fid",       1.91),
    ("img512-xxl-dino",        "img512-xxl-0939524-0.150",    None,                            1.00, "fd_dinov2", 42.84),
    ("img64-s-fid",            "img64-s-1073741-0.075",       None,                            1.00, "fid",       1.58),
    ("img64-m-fid",            "img64-m-2147483-0.060",       None,                            1.00, "fid",       1.43),
    ("img64-l-fid",            "img64-l-1073741-0.040",       None,                            1.00, "fid",       1.33),
    ("img64-xl-fid",           "img64-xl-0671088-0.040",      None,                            1.00, "fid",       1.33),
    # Classifier-free guidance with a separately trained unconditional XS model.
    ("img512-xs-guid-fid",     "img512-xs-2147483-0.045",     "img512-xs-uncond-2147483-0.045", 1.40, "fid",       2.91),
    ("img512-xs-guid-dino",    "img512-xs-2147483-0.150",     "img512-xs-uncond-2147483-0.150", 1.70, "fd_dinov2", 79.94),
    ("img512-s-guid-fid",      "img512-s-2147483-0.025",      "img512-xs-uncond-2147483-0.025", 1.40, "fid",       2.23),
    ("img512-s-guid-dino",     "img512-s-2147483-0.085",      "img512-xs-uncond-2147483-0.085", 1.90, "fd_dinov2", 52.32),
    ("img512-m-guid-fid",      "img512-m-2147483-0.030",      "img512-xs-uncond-2147483-0.030", 1.20, "fid",       2.01),
    ("img512-m-guid-dino",     "img512-m-2147483-0.015",      "img512-xs-uncond-2147483-0.015", 2.00, "fd_dinov2", 41.98),
    ("img512-l-guid-fid",      "img512-l-1879048-0.015",      "img512-xs-uncond-2147483-0.015", 1.20, "fid",       1.88),
    ("img512-l-guid-dino",     "img512-l-1879048-0.035",      "img512-xs-uncond-2147483-0.035", 1.70, "fd_dinov2", 38.20),
    ("img512-xl-guid-fid",     "img512-xl-1342177-0.020",     "img512-xs-uncond-2147483-0.020", 1.20, "fid",       1.85),
    ("img512-xl-guid-dino",    "img512-xl-1342177-0.030",     "img512-xs-uncond-2147483-0.030", 1.70, "fd_dinov2", 35.67),
    ("img512-xxl-guid-fid",    "img512-xxl-0939524-0.015",    "img512-xs-uncond-2147483-0.015", 1.20, "fid",       1.81),
    ("img512-xxl-guid-dino",   "img512-xxl-0939524-0.015",    "img512-xs-uncond-2147483-0.015", 1.70, "fd_dinov2", 33.09),
    # Autoguidance (arXiv 2406.02507): guided by a smaller, less-trained model of the same task.
    ("img512-s-autog-fid",     "img512-s-2147483-0.070",      "img512-xs-0134217-0.125",        2.10, "fid",       1.34),
    ("img512-s-autog-dino",    "img512-s-2147483-0.120",      "img512-xs-0134217-0.165",        2.45, "fd_dinov2", 36.67),
    ("img512-xxl-autog-fid",   "img512-xxl-0939524-0.075",    "img512-m-0268435-0.155",         2.05, "fid",       1.25),
    ("img512-xxl-autog-dino",  "img512-xxl-0939524-0.130",    "img512-m-0268435-0.205",         2.30, "fd_dinov2", 24.18),
    ("img512-s-uncond-autog-fid",  "img512-s-uncond-2147483-0.070", "img512-xs-uncond-0134217-0.110", 2.85, "fid", 3.86),
    ("img512-s-uncond-autog-dino", "img512-s-uncond-2147483-0.090", "img512-xs-uncond-0134217-0.125", 2.90, "fd_dinov2", 90.39),
    ("img64-s-autog-fid",      "img64-s-1073741-0.045",       "img64-xs-0134217-0.110",         1.70, "fid",       1.01),
    ("img64-s-autog-dino",     "img64-s-1073741-0.105",       "img64-xs-0134217-0.175",         2.20, "fd_dinov2", 31.85),
]


def _posthoc_url(stem: str) -> str:
    return f"{POSTHOC_URL}/edm2-{stem}.pkl"


GENERATION_PRESETS: dict[str, GenerationPreset] = {
    f"edm2-{_n}": GenerationPreset(f"edm2-{_n}", _posthoc_url(_net), _posthoc_url(_g) if _g else None, _w, _m, _v)
    for _n, _net, _g, _w, _m, _v in _GENERATION
}


def get_generation_preset(name: str) -> GenerationPreset:
    """Look up a published generation preset by the authors' name
    ('edm2-img512-s-guid-dino'); the name without 'edm2-' is accepted too."""
    key = name if name.startswith("edm2-") else f"edm2-{name}"
    if key not in GENERATION_PRESETS:
        raise ValueError(f"unknown generation preset {name!r}; allowed: {', '.join(GENERATION_PRESETS)} "
                         f"(`edm2 generate --list-presets` lists them)")
    return GENERATION_PRESETS[key]


def format_generation_presets(markdown: bool = False) -> str:
    """The table of `GENERATION_PRESETS`: name, guidance weight, the metric it
    was tuned for and the authors' reported value, then the net and gnet files
    (names under `POSTHOC_URL`, without `.pkl`). `markdown=True` gives a
    Markdown table (the documentation's), else aligned plain text
    (`edm2 generate --list-presets`)."""
    metric = {"fid": "FID", "fd_dinov2": "FD_DINOv2"}
    header = ["preset", "guidance", "tuned for", "reported", "net", "gnet"]

    def stem(url):
        return url.rsplit("/", 1)[-1].removesuffix(".pkl") if url else "-"

    rows = [[p.name, f"{p.guidance:g}", metric.get(p.metric, p.metric), f"{p.reported:g}", stem(p.net), stem(p.gnet)]
            for p in GENERATION_PRESETS.values()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(f"`{c}`" if i in (0, 4, 5) and c != "-" else c for i, c in enumerate(r)) + " |"
                  for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join([*lines, f"(files: {POSTHOC_URL}/NAME.pkl)"])


def apply_generation_preset(name: str | None, net=None, gnet=None, guidance=None):
    """(net, gnet, guidance) with a published preset filling in what was not
    given; explicit values win, as in the authors' generate script."""
    if name:
        preset = get_generation_preset(name)
        net, gnet = net or preset.net, gnet or preset.gnet
        guidance = preset.guidance if guidance is None else guidance
    return net, gnet, guidance
