"""Mapping between dataset items and the network's space (paper App. B.1, "Latent diffusion").

- `StandardRGBEncoder`: uint8 pixels <-> [-1, 1].
- `StabilityVAEEncoder`: 8-channel latent items (posterior mean, std of the
  Stable Diffusion VAE) -> sampled, standardised latents; decoding runs the
  VAE decoder (diffusers `AutoencoderKL`) back to uint8 pixels.

An encoder is described in snapshot metadata by `to_meta()` and rebuilt with
`encoder_from_meta()`.
"""
from __future__ import annotations

import os
import socket
import warnings
from urllib.parse import urlparse

import numpy as np
import torch

from .nn.hub import looks_local
from .utils.errors import EDM2Error

__all__ = ["StandardRGBEncoder", "StabilityVAEEncoder", "encoder_from_meta", "load_vae", "VAEUnavailable",
           "DEFAULT_VAE"]

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)


class VAEUnavailable(EDM2Error, RuntimeError):
    """The VAE weights could not be loaded (offline, no cache, bad folder)."""


class StandardRGBEncoder:
    """Pixel-space data: x / 127.5 - 1 and back (docs/design.md#latents)."""

    kind = "rgb"

    def to_meta(self) -> dict:
        return {"type": self.kind}

    def encode_latents(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Dataset item (uint8 pixels) -> network space, float32 in [-1, 1]."""
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Network output -> uint8 pixels."""
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


def load_vae(vae: str = DEFAULT_VAE, device="cpu"):
    """Load the Stable Diffusion VAE with diffusers: `vae` is a local folder
    (written by `AutoencoderKL.save_pretrained`) or a hub name, read from the
    Hugging Face cache or downloaded into it. Raises VAEUnavailable with a how-to
    when it can't."""
    try:
        from diffusers import AutoencoderKL  # optional (edm2[vae]) and slow to import
    except ImportError:
        raise VAEUnavailable("the VAE needs diffusers: pip install 'edm2[vae]' (or pip install diffusers)") from None
    name_or_path = str(vae)
    howto = (f"either allow the download of {DEFAULT_VAE} from the Hugging Face hub (it goes to $HF_HOME, "
             f"default ~/.cache/huggingface), or save it once with AutoencoderKL.from_pretrained(...)"
             f".save_pretrained(DIR) on a machine with network access and pass vae=DIR")
    local = os.path.isdir(name_or_path)
    if not local and looks_local(name_or_path):  # a path, not a hub name "user/name"
        raise VAEUnavailable(f"vae={name_or_path}: no such folder (a VAE is a folder written by "
                             f"save_pretrained, or a hub name like {DEFAULT_VAE}); {howto}")
    from diffusers.utils import logging as dlogging  # diffusers is importable here (checked above)
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # no advice about optional packages on every load
    try:
        try:  # a local folder, or the hub name already in the cache: no network
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation chatter from huggingface_hub
                vae = AutoencoderKL.from_pretrained(name_or_path, local_files_only=True)
        except Exception as e:
            if local:
                raise VAEUnavailable(f"vae={name_or_path}: not a diffusers AutoencoderKL folder (needs config.json "
                                     f"and diffusion_pytorch_model.safetensors; {type(e).__name__})") from None
            if not _hub_reachable():  # fail at once instead of minutes of retries
                raise VAEUnavailable(f"cannot load VAE {name_or_path!r}: it is not in the Hugging Face cache and "
                                     f"the hub cannot be reached (offline); {howto}") from None
            try:
                vae = AutoencoderKL.from_pretrained(name_or_path)
            except Exception as e:
                raise VAEUnavailable(f"cannot load VAE {name_or_path!r} ({type(e).__name__}); {howto}") from None
    finally:
        dlogging.set_verbosity(verbosity)
    return vae.eval().requires_grad_(False).to(device)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host does not answer within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection says nothing; let the download try
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


class StabilityVAEEncoder:
    """Latent-space data through the SD VAE; standardisation of paper App. B.1."""

    kind = "sd-vae"

    def __init__(self, vae_name: str = DEFAULT_VAE, raw_mean=RAW_MEAN, raw_std=RAW_STD,
                 final_mean: float = 0.0, final_std: float = 0.5, batch_size: int = 8, vae=None):
        """vae: an already loaded AutoencoderKL to use instead of loading vae_name."""
        self.vae_name = vae_name
        self.raw_mean = np.asarray(raw_mean, dtype=np.float32)
        self.raw_std = np.asarray(raw_std, dtype=np.float32)
        self.final_mean = float(final_mean)
        self.final_std = float(final_std)
        self.scale = self.final_std / self.raw_std                       # 0.5 / raw_std
        self.bias = self.final_mean - self.raw_mean * self.scale          # -raw_mean * scale
        self.batch_size = batch_size
        self._vae = vae

    def to_meta(self) -> dict:
        return {"type": self.kind, "vae_name": self.vae_name, "raw_mean": self.raw_mean.tolist(),
                "raw_std": self.raw_std.tolist(), "final_mean": self.final_mean, "final_std": self.final_std}

    def _const(self, v, x):
        return torch.as_tensor(v, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)

    def vae(self, device="cpu"):
        if self._vae is None:
            self._vae = load_vae(self.vae_name, device)
        return self._vae.to(device)

    @torch.no_grad()
    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [N, 3, H, W] -> [N, 8, H/8, W/8] float32: posterior mean, std."""
        vae = self.vae(x.device)
        outs = []
        for chunk in x.split(self.batch_size):
            dist = vae.encode(chunk.to(torch.float32) / 255)["latent_dist"]
            outs.append(torch.cat([dist.mean, dist.std], dim=1).to(torch.float32))
        return torch.cat(outs)

    def encode_latents(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Dataset item [N, 8, h, w] -> one posterior sample, standardised (scale, bias applied once)."""
        x = x.to(torch.float32)
        mean, std = x[:, :4], x[:, 4:]
        noise = torch.randn(mean.shape, device=x.device, generator=generator)
        z = mean + noise * std
        return z * self._const(self.scale, z) + self._const(self.bias, z)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised latents [N, 4, h, w] -> uint8 pixels [N, 3, 8h, 8w]."""
        vae = self.vae(x.device)
        x = x.to(torch.float32)
        x = (x - self._const(self.bias, x)) / self._const(self.scale, x)
        dtype = getattr(vae, "dtype", torch.float32)  # a float16 VAE (pipe.to(torch.float16)) takes float16 latents
        outs = []
        for chunk in x.split(self.batch_size):
            img = vae.decode(chunk.to(dtype))["sample"].to(torch.float32)
            outs.append(img.clamp(0, 1).mul(255).to(torch.uint8))
        return torch.cat(outs)


def encoder_from_meta(meta: dict, vae=None):
    """Rebuild the encoder that a snapshot's metadata (meta['encoder']) describes;
    `vae`: an AutoencoderKL object for latent encoders (else loaded by name when needed)."""
    kind = meta.get("type")
    if kind == StandardRGBEncoder.kind:
        if vae is not None:
            raise EDM2Error("a pixel-space network (encoder 'rgb') takes no VAE")
        return StandardRGBEncoder()
    if kind == StabilityVAEEncoder.kind:
        args = {k: meta[k] for k in ("vae_name", "raw_mean", "raw_std", "final_mean", "final_std") if k in meta}
        return StabilityVAEEncoder(**args, vae=vae)
    raise EDM2Error(f"unknown encoder type {kind!r} in snapshot metadata; allowed: 'rgb', 'sd-vae'")
