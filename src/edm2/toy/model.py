"""The toy denoiser: an MLP of magnitude-preserving layers that outputs the
log-density log p(x; sigma) of a 2D point, with the score by autograd
(autoguidance paper, Sec. 3 / Appendix; EDM2 Sec. 3 for the layers).

Preconditioning (EDM, Karras et al. 2022, Sec. 5 transcribed to log-densities):
    log p(x; sigma) = -1/2 |c_in x|^2 + out_gain * mean_j(F_j(c_in x, c_noise)^2) / sigma
with c_in = 1 / sqrt(sigma^2 + sigma_data^2) and c_noise = ln(sigma) / 4. The
first term is the log-density of N(0, (sigma^2 + sigma_data^2) I), so the
untrained net (out_gain = 0) is the best Gaussian guess; its denoiser
D = x + sigma^2 grad log p is then c_skip x, EDM's skip connection. The
learned term is divided by sigma so that its score contribution scales
like 1 / sigma, as the true score of thin structures does.

Snapshots are safetensors files with JSON metadata (key "edm2-toy"); never pickle.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..nn import MPConv, mp_silu
from ..utils.errors import EDM2Error, MissingFileError
from ..utils.fileio import atomic_write_bytes

__all__ = ["ToyNetConfig", "ToyNet", "save_toy", "load_toy", "TOY_FORMAT"]

TOY_FORMAT = "edm2-toy"


@dataclass
class ToyNetConfig:
    num_layers: int = 4      # hidden MP layers after the input layer
    hidden_dim: int = 64     # features per hidden layer
    sigma_data: float = 0.5  # expected std of the data (EDM preconditioning)

    def check(self):
        if self.num_layers < 1 or self.hidden_dim < 1:
            raise EDM2Error(f"toy net: layers={self.num_layers} and dim={self.hidden_dim} must both be >= 1")
        if self.sigma_data <= 0:
            raise EDM2Error(f"toy net: sigma_data={self.sigma_data} must be > 0")


class ToyNet(torch.nn.Module):
    """log p(x; sigma) for points x [N, 2]; `score` and `forward` (the denoiser)
    are derived from it. forward(x, sigma, labels=None) has Precond's call
    signature so it can be passed to edm2.sampling.edm_sampler directly."""

    def __init__(self, config: ToyNetConfig | None = None):
        super().__init__()
        self.config = config or ToyNetConfig()
        self.config.check()
        c = self.config
        self.sigma_data = c.sigma_data
        # Input: [c_in x (2), c_noise, 1]; the constant 1 plays the role of a bias.
        self.layers = torch.nn.ModuleList([MPConv(4, c.hidden_dim)])
        self.layers.extend(MPConv(c.hidden_dim, c.hidden_dim) for _ in range(c.num_layers))
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

    def logp(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Unnormalised log p(x; sigma), shape x.shape[:-1]."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32).broadcast_to(x.shape[:-1])[..., None]
        xin = x / (sigma ** 2 + self.sigma_data ** 2).sqrt()                             # c_in x
        y = torch.cat([xin, sigma.log() / 4, torch.ones_like(sigma)], dim=-1)
        y = self.layers[0](y)
        for layer in self.layers[1:]:
            y = layer(mp_silu(y))
        energy = y.square().mean(-1) * self.out_gain / sigma[..., 0]
        return energy - 0.5 * xin.square().sum(-1)

    def score(self, x: torch.Tensor, sigma, create_graph: bool = False) -> torch.Tensor:
        """grad_x log p(x; sigma) by autograd; works under torch.no_grad too."""
        with torch.enable_grad():
            x = x.detach().to(torch.float32).requires_grad_(True)
            logp = self.logp(x, sigma)
            (grad,) = torch.autograd.grad(logp.sum(), x, create_graph=create_graph)
        return grad

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """Denoiser D(x; sigma) = x + sigma^2 grad log p(x; sigma) (Tweedie); labels ignored."""
        s = torch.as_tensor(sigma, dtype=torch.float32).broadcast_to(x.shape[:-1])[..., None]
        return x.to(torch.float32) + s ** 2 * self.score(x, sigma)


def save_toy(path, net: ToyNet, meta: dict) -> None:
    """Atomically write a toy net as safetensors + JSON metadata (config, training state)."""
    header = {"format": TOY_FORMAT, "version": 1, "config": asdict(net.config), **meta}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={TOY_FORMAT: json.dumps(header)}))


def read_toy_meta(path) -> dict:
    """The JSON metadata of a toy snapshot (raises ValueError for other files)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such toy snapshot")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[TOY_FORMAT])
    except Exception:
        raise EDM2Error(f"{path}: not a toy snapshot "
                         f"(expected a .safetensors file written by `edm2 toy train`)") from None
    return meta


def load_toy(path) -> tuple[ToyNet, dict]:
    """Load a toy snapshot -> (ToyNet in eval mode without parameter gradients, metadata)."""
    meta = read_toy_meta(path)
    net = ToyNet(ToyNetConfig(**meta["config"]))
    try:
        net.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise EDM2Error(f"{path}: weights do not match the config in its metadata: {str(e).splitlines()[0]}") from None
    return net.eval().requires_grad_(False), meta
