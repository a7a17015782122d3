"""One constructor for every network of the paper's ablation ladder (Table 1).

`build_network(config, **net_kwargs)` is how edm2 makes a network: training,
snapshot loading, post-hoc EMA, generation and metrics all go through it, with
the config letter stored in a snapshot's metadata (absent: G).

    A, B   edm2.nn.adm.ADMPrecond   (B: learned uncertainty, App. B.2)
    C-F    edm2.nn.rungs.LadderPrecond
    G      edm2.nn.Precond          (the final network; the published checkpoints)
"""
from __future__ import annotations

import torch

from ..utils.errors import EDM2Error
from .adm import ADMPrecond
from .rungs import LadderPrecond
from .unet import Precond

CONFIGS = ("A", "B", "C", "D", "E", "F", "G")
"""The network configs of the paper's ablation (Table 1), one letter a row."""


def check_config(config) -> str:
    """The config letter, or `EDM2Error` naming the allowed ones."""
    if config not in CONFIGS:
        raise EDM2Error(f"config={config!r}: unknown; allowed: {', '.join(CONFIGS)} (the rows of the paper's Table 1)")
    return config


def build_network(config: str = "G", **net_kwargs) -> torch.nn.Module:
    """The denoiser of config `config` (A-G) built with `net_kwargs`, the
    keyword arguments of its class. All share Precond's forward signature
    `net(x, sigma, class_labels=None, force_fp32=False, return_logvar=False)`."""
    config = check_config(config)
    if config == "G":
        return Precond(**net_kwargs)
    if config in ("A", "B"):  # the ADM network; B adds the learned uncertainty u(sigma) (App. B.2)
        return ADMPrecond(uncertainty=config == "B", **net_kwargs)
    return LadderPrecond(config=config, **net_kwargs)


def network_config(net: torch.nn.Module) -> str:
    """The config letter of a network built by `build_network`."""
    return getattr(net, "config", "G")
