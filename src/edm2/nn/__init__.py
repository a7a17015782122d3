"""EDM2 network: magnitude-preserving layers, U-Net and preconditioning."""
from .factory import CONFIGS, build_network, check_config, network_config
from .layers import MPConv, MPFourier, force_normalize_, mp_cat, mp_silu, mp_sum, normalize, resample
from .rungs import LadderPrecond
from .unet import DTYPES, Block, Precond, UNet, check_architecture, precision_kwargs, set_precision

__all__ = [
    "normalize", "mp_silu", "mp_sum", "mp_cat", "resample", "MPFourier", "MPConv", "force_normalize_",
    "Block", "UNet", "Precond", "set_precision", "precision_kwargs", "check_architecture",
    "DTYPES", "LadderPrecond", "CONFIGS", "build_network", "check_config", "network_config",
]
