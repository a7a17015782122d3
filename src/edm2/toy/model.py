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

Snapshots are ordinary edm2 snapshot files (`edm2.io.snapshot`: safetensors + JSON
metadata), written by `edm2.ema.PowerFunctionEMA`; the toy's own settings are in
the metadata's "toy" entry. Never pickle.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..io.snapshot import SnapshotError, read_snapshot_meta
from ..nn import MPConv, mp_silu
from ..utils.errors import EDM2Error, MissingFileError

# Metadata key of the toy's own snapshot format before it used edm2 snapshots.
_OLD_TOY_FORMAT = "edm2-toy"


@dataclass
class ToyNetConfig:
    num_layers: int = 4      # hidden MP layers after the input layer
    hidden_dim: int = 64     # features per hidden layer
    sigma_data: float = 0.5  # expected std of the data (EDM preconditioning)

    def check(self):
        if self.num_layers < 1 or self.hidden_dim < 1:
            raise EDM2Error(f"toy net: num_layers={self.num_layers} and hidden_dim={self.hidden_dim} must both be >= 1")
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


def toy_snapshot_meta(net: ToyNet, classes: str, train: dict | None = None) -> dict:
    """Snapshot metadata of a toy net for `PowerFunctionEMA(meta=...)` (edm2.io.snapshot's
    fields, minus nimg and ema_std which the tracker adds): the net's config, the
    ground truth it learns and the training settings, under "toy"."""
    return {"net_kwargs": None, "encoder": {}, "dataset": {},
            "origin": {"module": "edm2.toy.model.ToyNet", "tool": "edm2.toy.train_toy"},
            "toy": {"classes": classes, "config": asdict(net.config), "train": train or {}}}


def _refuse_old_toy_file(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            old = _OLD_TOY_FORMAT in (f.metadata() or {})
    except Exception:
        old = False
    if old:
        raise EDM2Error(f"{path}: a toy snapshot in the former toy-<iter>-<sigma_rel>.safetensors format, "
                        f"written by an older edm2; retrain with `edm2 toy train`")


def load_toy(path) -> tuple[ToyNet, dict]:
    """Load a toy snapshot -> (ToyNet in eval mode without parameter gradients, metadata).

    The metadata returned is the snapshot's "toy" entry (classes, config, train)
    with the snapshot's nimg and ema_std (its sigma_rel), and iter (nimg / batch
    size) when the training settings are known."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such toy snapshot")
    _refuse_old_toy_file(path)
    try:
        meta = read_snapshot_meta(path)
        toy = meta["toy"]
        config = ToyNetConfig(**toy["config"])
    except (SnapshotError, KeyError, TypeError):
        raise EDM2Error(f"{path}: not a toy snapshot "
                        f"(expected a .safetensors file written by `edm2 toy train`)") from None
    net = ToyNet(config)
    try:
        net.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise EDM2Error(f"{path}: weights do not match the config in its metadata: {str(e).splitlines()[0]}") from None
    out = dict(toy, nimg=int(meta["nimg"]), ema_std=meta.get("ema_std"))
    batch = (toy.get("train") or {}).get("batch_size")
    if batch:
        out["iter"] = int(meta["nimg"]) // int(batch)
    return net.eval().requires_grad_(False), out
