"""EDM2 networks: the magnitude-preserving layers, the U-Net of config G with its
preconditioning (`Precond`, the published networks' layout), and the networks of the
paper's ablation configs A-F (`build_network(config, **kwargs)`). Modules: `layers`,
`denoiser` (the `Denoiser` base: EDM preconditioning, u(sigma), precision), `unet`,
`adm` (A-B), `rungs` (C-F), `factory`, `hub` (the huggingface_hub mixin of `Precond`)."""
# `name as name`: used across the package, importable from here but not in `__all__`.
from .adm import ADMPrecond
from .denoiser import DTYPES as DTYPES
from .denoiser import Denoiser, check_precision, set_precision
from .denoiser import precision_kwargs as precision_kwargs
from .denoiser import precond_coefficients as precond_coefficients
from .factory import CONFIGS, build_network, check_config, network_config
from .layers import MPConv, MPFourier, force_normalize_, mp_cat, mp_silu, mp_sum, normalize
from .layers import resample as resample
from .rungs import LadderPrecond
from .unet import Block, Precond, UNet
from .unet import check_architecture as check_architecture

__all__ = [
    "normalize", "mp_silu", "mp_sum", "mp_cat", "MPFourier", "MPConv", "force_normalize_",
    "Block", "UNet", "Precond", "Denoiser", "LadderPrecond", "ADMPrecond",
    "set_precision", "check_precision", "CONFIGS", "check_config", "build_network", "network_config",
]
