"""EDM2 network: magnitude-preserving layers, U-Net and preconditioning; the networks of configs A-F."""
from .denoiser import DTYPES, Denoiser, check_precision, precision_kwargs, precond_coefficients, set_precision
from .factory import CONFIGS, build_network, check_config, network_config
from .layers import MPConv, MPFourier, force_normalize_, mp_cat, mp_silu, mp_sum, normalize, resample
from .rungs import LadderPrecond
from .unet import Block, Precond, UNet, check_architecture

__all__ = [
    "normalize", "mp_silu", "mp_sum", "mp_cat", "resample", "MPFourier", "MPConv", "force_normalize_",
    "Block", "UNet", "Precond", "Denoiser", "LadderPrecond", "precond_coefficients",
    "DTYPES", "check_precision", "set_precision", "precision_kwargs",
    "CONFIGS", "check_config", "build_network", "network_config", "check_architecture",
]
