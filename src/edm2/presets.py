"""Training presets: the paper's ImageNet recipes (Table 6) and small ones,
and the training recipe of every config A-G of the paper's ablation (Table 1).

A preset is plain data. `Preset.net_kwargs(label_dim)` gives the keyword
arguments of the network (`edm2.nn.build_network(preset.config, ...)`); the
training fields feed the trainer. `get_preset(name, config)` composes a size
preset with a config's recipe (`RECIPES`, `apply_recipe`; docs/ablation.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .nn.factory import check_config
from .utils.errors import EDM2Error

__all__ = ["Preset", "PRESETS", "get_preset", "Recipe", "RECIPES", "apply_recipe", "GenerationPreset",
           "GENERATION_PRESETS", "get_generation_preset", "apply_generation_preset"]

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
    channel_mult_emb: int | None = None   # embedding width / model_channels (None: max(channel_mult), Figure 21)
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
    sigma_rel: tuple = (0.050, 0.100)
    # The config of the ablation ladder (Table 1) and the recipe fields it sets (see RECIPES).
    config: str = "G"
    loss: str = "uncertainty"         # 'uncertainty': learned u(sigma), Eq. 21; 'edm': EDM's loss, Eq. 14
    adam_beta2: float = 0.99
    loss_scaling: float = 1.0
    ema: str = "power"                # 'power': power-function EMA + post-hoc (sigma_rel); 'traditional'
    ema_halflife: float = 0.0         # traditional EMA: half-life in images
    ema_rampup_ratio: float = 0.05    # traditional EMA: half-life <= this ratio of the images seen (EDM)

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
            **({} if self.channel_mult_emb is None else {"channel_mult_emb": self.channel_mult_emb}),
        )

    def replace(self, **changes) -> Preset:
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

# Small presets of our own, for CPUs and small data sets (docs/design.md#presets).
PRESETS["cpu-32"] = Preset(
    name="cpu-32",
    description="32x32 grey or RGB on a laptop CPU (the Fashion-MNIST demo)",
    img_resolution=32, img_channels=1, latent=False,
    # Narrow and shallow for ~8 min on 2 cores; batch 32: twice the steps of 64 per image, which
    # matters more than batch noise this early (docs/training.md#the-cpu-presets).
    model_channels=24, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,), channels_per_head=32,
    lr=0.0100, decay=2000, rampup_Mimg=0.002, P_mean=-0.8, P_std=1.6,
    batch=32, duration=16 * Ki, status=2 * Ki, snapshot=8 * Ki, checkpoint=8 * Ki)
# `make demo` (docs/training.md#the-demo-preset): cpu-32's network with the schedule that gave the most
# recognisable samples within 10 minutes on 2 cores (BENCHMARKS.md, "Demo recipe"). Snapshots every 4Ki
# images: the first one (sigma_rel 0.05) is the demo's autoguidance guide (Karras et al. 2024).
PRESETS["demo"] = PRESETS["cpu-32"].replace(
    name="demo",
    description="the Fashion-MNIST demo: cpu-32's network, ~6.5 min of training on 2 cores",
    lr=0.0200, decay=512, duration=32 * Ki, snapshot=4 * Ki, checkpoint=16 * Ki, sigma_rel=(0.050, 0.100))
PRESETS["tiny"] = Preset(
    name="tiny",
    description="smallest sensible network, for tests and smoke runs",
    img_resolution=16, img_channels=1, latent=False,
    model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), channels_per_head=16,
    lr=0.0100, decay=100, rampup_Mimg=0.0001, P_mean=-0.8, P_std=1.6,
    batch=8, duration=64, status=16, snapshot=32, checkpoint=32)

# CIFAR-scale (32x32 RGB pixels, 39.5M parameters at config G), the size of the published CIFAR-10/100
# re-implementation of configs C, E and G (docs/training.md#the-cifar-scale-preset): its network shape, batch,
# learning rate, warm-up, decay start, dropout and duration; the paper's ImageNet-64 pixel recipe (Table 6)
# for the noise distribution and the EMA. Compose with --config C / E / G.
PRESETS["cifar-32"] = Preset(
    name="cifar-32",
    description="CIFAR-10/100 scale, 32x32 RGB pixels (configs C, E, G of the published re-implementation)",
    img_resolution=32, img_channels=3, latent=False,
    model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2, attn_resolutions=(16,), channels_per_head=64,
    channel_mult_emb=4, dropout=0.13,
    # alpha_ref 0.02 at batch 512 (config E/G); config C's x0.02 ratio (Table 1) gives its 4e-4.
    # t_ref = 400 epochs of 50,000 images at batch 512 (Eq. 67); warm-up 200 epochs = 10M images (App. B.5).
    lr=0.0200, decay=39062, rampup_Mimg=10, P_mean=-0.8, P_std=1.6,
    batch=512, duration=96 * Mi, status=256 * Ki, snapshot=4 * Mi, checkpoint=16 * Mi)


def get_preset(name: str, config: str = "G") -> Preset:
    """Look up a preset (the reference's `edm2-` prefix is accepted too),
    composed with the training recipe of `config` (A-G; G: the preset as is)."""
    key = name[len("edm2-"):] if name.startswith("edm2-") else name
    if key not in PRESETS:
        raise EDM2Error(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)} (an 'edm2-' prefix is accepted)")
    return apply_recipe(PRESETS[key], config)


# ---------------------------------------------------------------------------
# The ablation ladder of the paper (Table 1, Figs. 16-22): each config's
# training recipe, as the paper gives it at EDM2-S size (img512-s).
# ---------------------------------------------------------------------------

# Config A's traditional EMA: half-life 50M images of a 2147.5M-image (2^31) run (App. B.1).
_A_HALFLIFE_FRACTION = 50e6 / 2 ** 31


def traditional_ema_halflife(duration: int) -> float:
    """Config A's EMA half-life, in images, for a run of `duration` training
    images: the same fraction of the training as the paper's 50M of 2147.5M
    (App. B.1). `edm2 train` (and so every rung of the ladder) computes it from
    the run's own duration when the run starts, and a resume keeps it."""
    return duration * _A_HALFLIFE_FRACTION


@dataclass(frozen=True)
class Recipe:
    """What one config of Table 1 trains with, at the paper's size (img512-s).

    `lr` is the paper's alpha_ref; at another size it scales with the size
    preset's own (config G) learning rate, lr_preset * lr / 0.0100.
    None means "the size preset's value".
    """
    config: str
    title: str                 # the row of Table 1
    loss: str                  # 'edm' (Eq. 14) or 'uncertainty' (Eq. 21)
    adam_beta2: float          # 0.999 (A) or 0.99 (B-G), App. B.2
    lr: float                  # alpha_ref at img512-s
    lr_decay: bool             # inverse-square-root decay after t_ref (E-G, Eq. 67) or constant (A-D)
    weight_norm: str           # 'none' (A-C), 'standard' (D, Eq. 47), 'forced' (E-G, Eq. 66): the network's
    P_mean: float | None       # A: EDM's -1.2 / 1.2; B-G: the preset's (-0.4 / 1.0 on ImageNet-512 latents)
    P_std: float | None
    dropout: float | None      # 10% in A-F; G: the preset's (0 at XS and S)
    loss_scaling: float        # 100 (A-C), 1 (D-G)
    batch_factor: int          # A: twice the batch of B-G (4096 vs 2048), same images in all
    extra_attention: bool      # A: self-attention one resolution above the preset's highest (32x32 at S)
    ema: str                   # 'traditional' (A) or 'power' (B-G, Sec. 3)
    sigma_rel: float | None    # the paper's post-hoc optimum (Fig. 5a); A: traditional EMA, sigma_rel ~0.034
    fid: float                 # Table 1 at img512-s
    mparams: float
    gflops: float


RECIPES: dict[str, Recipe] = {r.config: r for r in [
    Recipe("A", "EDM baseline", "edm", 0.999, 0.0001, False, "none", -1.2, 1.2, 0.10, 100.0, 2, True,
           "traditional", None, 8.00, 295.9, 110.4),
    Recipe("B", "+ minor improvements", "uncertainty", 0.99, 0.0002, False, "none", None, None, 0.10, 100.0, 1,
           False, "power", 0.090, 7.24, 291.8, 100.4),
    Recipe("C", "+ architectural streamlining", "uncertainty", 0.99, 0.0002, False, "none", None, None, 0.10, 100.0,
           1, False, "power", 0.075, 6.96, 277.8, 100.3),
    Recipe("D", "+ magnitude-preserving learned layers", "uncertainty", 0.99, 0.0100, False, "standard", None, None,
           0.10, 1.0, 1, False, "power", 0.225, 3.75, 277.8, 101.2),
    Recipe("E", "+ control effective learning rate", "uncertainty", 0.99, 0.0100, True, "forced", None, None, 0.10,
           1.0, 1, False, "power", 0.145, 3.02, 277.8, 101.2),
    Recipe("F", "+ remove group normalizations", "uncertainty", 0.99, 0.0100, True, "forced", None, None, 0.10, 1.0,
           1, False, "power", 0.100, 2.71, 280.2, 102.1),
    Recipe("G", "+ magnitude-preserving fixed-function layers", "uncertainty", 0.99, 0.0100, True, "forced", None,
           None, None, 1.0, 1, False, "power", 0.130, 2.56, 280.2, 102.2),
]}

_G_LR = RECIPES["G"].lr


def apply_recipe(preset: Preset, config: str) -> Preset:
    """The size preset `preset` trained with config `config`'s recipe.

    G returns the preset unchanged. For the others (docs/ablation.md, "Smaller
    and other presets"): the learning rate is the preset's times the config's
    ratio to G in the paper (A x0.01, B-C x0.02, D-F x1); A-D keep it constant;
    P_mean/P_std, dropout, Adam beta2, loss and loss scaling as in Table 1's
    figures; A doubles the batch, adds self-attention one resolution above the
    preset's highest, and uses a traditional EMA whose half-life is the same
    fraction of the training as 50M of 2147.5M images.
    """
    r = RECIPES[check_config(config)]
    if config == "G":
        return preset
    changes = dict(config=config, loss=r.loss, adam_beta2=r.adam_beta2, loss_scaling=r.loss_scaling, ema=r.ema,
                   lr=round(preset.lr * r.lr / _G_LR, 12), decay=preset.decay if r.lr_decay else 0)
    if r.P_mean is not None:
        changes.update(P_mean=r.P_mean, P_std=r.P_std)
    if r.dropout is not None:
        changes.update(dropout=r.dropout)
    if r.batch_factor != 1:
        changes.update(batch=preset.batch * r.batch_factor)
    if r.extra_attention:
        top = min(2 * max(preset.attn_resolutions), preset.img_resolution)
        changes.update(attn_resolutions=tuple(sorted(set(preset.attn_resolutions) | {top}, reverse=True)))
    if r.ema == "traditional":
        # For the preset's default duration; a run computes it from its own (traditional_ema_halflife).
        changes.update(sigma_rel=(), ema_halflife=traditional_ema_halflife(preset.duration))
    return preset.replace(**changes)


# ---------------------------------------------------------------------------
# Generation presets of the authors' published models (net, gnet, guidance).
# Usage: docs/published-models.md.
# ---------------------------------------------------------------------------
# Facts taken from the authors' README / generate_images.py (preset name ->
# post-hoc reconstruction files and guidance weight; the metric each preset
# optimises and the value they report). `edm2 generate --preset NAME` resolves
# a preset through `get_generation_preset`; URLs are fetched into the download
# cache by edm2.io.official (docs/published-models.md).

# The authors' post-hoc reconstructions: edm2-img512-s-2147483-0.130.pkl, ...
POSTHOC_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"


@dataclass(frozen=True)
class GenerationPreset:
    """A published (net, gnet, guidance) triple, with the guidance interval where one was
    published. `gnet` is None without guidance."""
    name: str
    net: str                  # URL of the main network pickle
    gnet: str | None          # URL of the guiding network (unconditional: CFG; smaller/earlier: autoguidance)
    guidance: float           # guidance weight w (1 = none)
    metric: str               # 'fid' or 'fd_dinov2': what the EMA length and w were tuned for
    reported: float | None    # the authors' reported value of that metric (None: not documented)
    guidance_interval: tuple[float, float] | None = None  # (sigma_lo, sigma_hi]: guided steps (None: all)
    description: str = ""     # what the source does not document, and what was chosen instead


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


# Guidance interval (Kynkäänniemi et al., NeurIPS 2024; github.com/kynkaat/guidance-interval): EDM2-XXL
# guided by the unconditional XS model in a limited interval of noise levels. The authors give step
# indices at 32 Heun steps (rho 7, sigma 0.002-80): [17, 22] for FID (w 2.0, FID 1.40) and [13, 19]
# for FD_DINOv2 (w 2.9), i.e. the noise-level intervals (0.28, 1.61] and (0.6, 5.0].
_INTERVAL_FILES = ("The guidance-interval authors distribute their networks separately and do not document "
                   "their EMA lengths; this preset uses EDM2's own guided-{metric} XXL and XS-uncond "
                   "reconstructions (sigma_rel 0.015), so results may differ from the reported value.")
GENERATION_PRESETS.update({
    "edm2-img512-xxl-guid-interval-fid": GenerationPreset(
        "edm2-img512-xxl-guid-interval-fid", _posthoc_url("img512-xxl-0939524-0.015"),
        _posthoc_url("img512-xs-uncond-2147483-0.015"), 2.0, "fid", 1.40, (0.28, 1.61),
        _INTERVAL_FILES.format(metric="FID")),
    "edm2-img512-xxl-guid-interval-dino": GenerationPreset(
        "edm2-img512-xxl-guid-interval-dino", _posthoc_url("img512-xxl-0939524-0.015"),
        _posthoc_url("img512-xs-uncond-2147483-0.015"), 2.9, "fd_dinov2", None, (0.6, 5.0),
        _INTERVAL_FILES.format(metric="FD_DINOv2") + " Its README does not report the FD_DINOv2 value."),
})


def get_generation_preset(name: str) -> GenerationPreset:
    """Look up a published generation preset by the authors' name
    ('edm2-img512-s-guid-dino'); the name without 'edm2-' is accepted too."""
    key = name if name.startswith("edm2-") else f"edm2-{name}"
    if key not in GENERATION_PRESETS:
        raise EDM2Error(f"unknown generation preset {name!r}; allowed: {', '.join(GENERATION_PRESETS)} "
                         f"(`edm2 generate --list-presets` lists them)")
    return GENERATION_PRESETS[key]


def format_generation_presets(markdown: bool = False) -> str:
    """The table of `GENERATION_PRESETS`: name, guidance weight, guidance interval
    (sigma_lo,sigma_hi; '-' = every step), the metric it was tuned for and the
    authors' reported value ('-' = not documented), then the net and gnet files
    (names under `POSTHOC_URL`, without `.pkl`), followed by the presets'
    descriptions. `markdown=True` gives a Markdown table (the documentation's),
    else aligned plain text (`edm2 generate --list-presets`)."""
    metric = {"fid": "FID", "fd_dinov2": "FD_DINOv2"}
    header = ["preset", "guidance", "interval", "tuned for", "reported", "net", "gnet"]

    def stem(url):
        return url.rsplit("/", 1)[-1].removesuffix(".pkl") if url else "-"

    rows = [[p.name, f"{p.guidance:g}", ",".join(f"{v:g}" for v in p.guidance_interval) if p.guidance_interval
             else "-", metric.get(p.metric, p.metric), "-" if p.reported is None else f"{p.reported:g}",
             stem(p.net), stem(p.gnet)] for p in GENERATION_PRESETS.values()]
    notes = [f"{p.name}: {p.description}" for p in GENERATION_PRESETS.values() if p.description]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(f"`{c}`" if i in (0, 5, 6) and c != "-" else c for i, c in enumerate(r)) + " |"
                  for r in rows]
        return "\n".join([*lines, "", *(f"- `{n.split(': ', 1)[0]}`: {n.split(': ', 1)[1]}" for n in notes)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join([*lines, f"(files: {POSTHOC_URL}/NAME.pkl)", *notes])


def apply_generation_preset(name: str | None, net=None, gnet=None, guidance=None, guidance_interval=None):
    """(net, gnet, guidance, guidance_interval) with a published preset filling in
    what was not given; explicit values win, as in the authors' generate script."""
    if name:
        preset = get_generation_preset(name)
        net, gnet = net or preset.net, gnet or preset.gnet
        guidance = preset.guidance if guidance is None else guidance
        if guidance_interval is None and guidance != 1:  # the interval only means something when guided
            guidance_interval = preset.guidance_interval
    return net, gnet, guidance, guidance_interval
