"""Training of the toy denoiser against the exact ground-truth score, with
power-function EMA snapshots and their post-hoc reconstruction (EDM2 Sec. 3.1).

Loss (autoguidance paper, toy example; EDM2 Eq. 2 for small sigma):
    E_{sigma, x ~ p(x; sigma)} sigma^2 |s_theta(x; sigma) - grad log p(x; sigma)|^2,
ln sigma ~ N(P_mean, P_std^2); Adam(0.9, 0.99); learning rate ref_lr /
sqrt(max(iter / ref_iters, 1)) (EDM2 Eq. 121, edm2.loss.learning_rate_schedule).
Time is counted in training points ("nimg" = iterations x batch) like the
image trainer, so the EMA profiles and post-hoc math are the same.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import tqdm

from ..ema.profiles import solve_posthoc_coefficients, std_to_exp
from ..ema.trackers import PowerFunctionEMA
from ..loss import learning_rate_schedule
from ..utils.errors import EDM2Error, ExistingFileError, MissingFileError
from ..utils.fileio import atomic_write_bytes
from .gmm import CLASSES, tree_mixture
from .model import ToyNet, ToyNetConfig, load_toy, read_toy_meta, save_toy

__all__ = ["ToyTrainConfig", "ToyRun", "train_toy", "toy_snapshot_name", "list_toy_snapshots",
           "load_toy_run", "posthoc_toy"]


@dataclass
class ToyTrainConfig:
    classes: str = "A"                 # ground truth to learn: A, B or AB (unconditional)
    num_layers: int = 4
    hidden_dim: int = 64
    iters: int = 4096
    batch_size: int = 1024             # the paper's GPU run uses 4096; 1024 keeps a CPU run under 2 min
    sigma_groups: int = 16             # distinct sigma values per batch (the exact score is per-sigma fast)
    P_mean: float = -2.3
    P_std: float = 1.5
    sigma_data: float = 0.5
    ref_lr: float = 1e-2
    ref_iters: int = 512               # inverse-sqrt decay starts here
    ema_stds: tuple = (0.010, 0.050, 0.100)  # tracked power-function EMA profiles (sigma_rel); first = default
    snapshot_iters: int = 256          # 0 = only the final snapshot
    seed: int = 0
    threads: int = 1                   # torch intra-op threads while training (0 = leave torch's setting);
                                       # the ops are small, and on a busy CPU extra threads only contend

    def check(self):
        if self.classes not in CLASSES:
            raise EDM2Error(f"--classes={self.classes!r}: choose one of A, B, AB")
        if self.iters < 1 or self.batch_size < 1:
            raise EDM2Error(f"--iters={self.iters} and --batch={self.batch_size} must be >= 1")
        if not 1 <= self.sigma_groups <= self.batch_size or self.batch_size % self.sigma_groups:
            raise EDM2Error(f"sigma_groups={self.sigma_groups} must divide --batch={self.batch_size}")
        if self.snapshot_iters < 0:
            raise EDM2Error(f"--snapshot-every={self.snapshot_iters} must be >= 0")
        if not self.ema_stds:
            raise EDM2Error("--ema: track at least one EMA profile")
        std_to_exp(list(self.ema_stds))  # raises ValueError naming the allowed sigma_rel range
        self.net_config().check()

    def net_config(self) -> ToyNetConfig:
        return ToyNetConfig(num_layers=self.num_layers, hidden_dim=self.hidden_dim, sigma_data=self.sigma_data)


@dataclass
class ToyRun:
    """Result of train_toy: the raw net, the EMA nets by sigma_rel, and timing."""
    config: ToyTrainConfig
    net: ToyNet
    emas: dict
    seconds: float
    final_loss: float
    snapshots: list = field(default_factory=list)

    @property
    def ema(self) -> ToyNet:
        return self.emas[self.config.ema_stds[0]]


def toy_snapshot_name(iteration: int, ema_std: float) -> str:
    return f"toy-{iteration:06d}-{ema_std:.3f}.safetensors"


def list_toy_snapshots(folder) -> list[tuple[int, float, Path]]:
    """(iteration, ema_std, path) of the toy snapshots in a run folder, sorted."""
    out = []
    for p in Path(folder).glob("toy-*-*.safetensors"):
        parts = p.name[:-len(".safetensors")].split("-")
        try:
            out.append((int(parts[1]), float(parts[2]), p))
        except (IndexError, ValueError):
            continue
    return sorted(out)


def train_toy(config: ToyTrainConfig, outdir=None, progress: bool = True) -> ToyRun:
    """Train one toy model; with outdir, write EMA snapshots every
    config.snapshot_iters iterations (and at the end) plus training.json."""
    config.check()
    if outdir is not None:
        outdir = Path(outdir)
        if outdir.exists() and (list_toy_snapshots(outdir) or (outdir / "training.json").exists()):
            raise ExistingFileError(f"--outdir {outdir}: already holds a toy run; choose a new folder")
        outdir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, outdir, progress)
    finally:
        torch.set_num_threads(threads)


def _train(config: ToyTrainConfig, outdir, progress: bool) -> ToyRun:
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    gt = tree_mixture(config.classes)
    net = ToyNet(config.net_config()).train().requires_grad_(True)
    tracker = PowerFunctionEMA(net, config.ema_stds)
    emas = tracker.nets
    opt = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99), eps=1e-8)
    B, S = config.batch_size, config.sigma_groups
    snapshots, losses = [], []
    start = time.perf_counter()
    for it in tqdm.trange(config.iters, disable=not progress, desc=f"toy {config.classes} dim{config.hidden_dim}"):
        for g in opt.param_groups:
            g["lr"] = learning_rate_schedule(it * B, B, config.ref_lr, config.ref_iters, rampup_Mimg=0)
        # ln sigma ~ N(P_mean, P_std^2), shared by B/S points each; x ~ p(x; sigma) exactly.
        sigma = (torch.randn(S, generator=gen) * config.P_std + config.P_mean).exp().repeat_interleave(B // S)
        x = gt.sample(B, sigma, generator=gen)
        target = gt.score(x, sigma, dtype=torch.float32)
        pred = net.score(x, sigma, create_graph=True)
        loss = (sigma[:, None] ** 2 * (pred - target) ** 2).mean()   # sigma^2-weighted score matching
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in net.parameters():
            p.grad.nan_to_num_(nan=0, posinf=0, neginf=0)
        opt.step()
        losses.append(loss.item())
        # Power-function EMA (EDM2 Eq. 124), time in points seen after this step.
        t_next = (it + 1) * B
        tracker.update(net, t_next, B)
        last = it + 1 == config.iters
        if outdir is not None and (last or (config.snapshot_iters and (it + 1) % config.snapshot_iters == 0)):
            for std, ema in emas.items():
                path = outdir / toy_snapshot_name(it + 1, std)
                save_toy(path, ema, {"classes": config.classes, "iter": it + 1, "nimg": t_next,
                                     "ema_std": std, "train": asdict(config)})
                snapshots.append(path)
    seconds = time.perf_counter() - start
    final_loss = float(np.mean(losses[-min(len(losses), 64):]))
    run = ToyRun(config, net.eval().requires_grad_(False), emas, seconds, final_loss, snapshots)
    if outdir is not None:
        info = {"config": asdict(config), "seconds": seconds, "final_loss": final_loss,
                "snapshots": [p.name for p in snapshots]}
        atomic_write_bytes(outdir / "training.json", (json.dumps(info, indent=2) + "\n").encode())
    return run


def load_toy_run(source, ema_std: float | None = None, iteration: int | None = None):
    """A toy net from a snapshot file or a run folder -> (ToyNet, meta).

    For a folder: the snapshot at `iteration` (default the last) with profile
    `ema_std` (default the run's first tracked one); a profile that was not
    tracked is reconstructed post hoc from the stored ones (posthoc_toy)."""
    path = Path(source)
    if path.is_file():
        if ema_std is not None or iteration is not None:
            raise EDM2Error(f"{path}: --ema-std/--iter select inside a run folder; pass the folder instead of a file")
        return load_toy(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: no such toy snapshot or run folder")
    snaps = list_toy_snapshots(path)
    if not snaps:
        raise MissingFileError(f"{path}: no toy-*.safetensors snapshots; train one with `edm2 toy train --outdir {path}`")
    iteration = iteration if iteration is not None else snaps[-1][0]
    if ema_std is None:
        ema_std = read_toy_meta(snaps[-1][2])["train"]["ema_stds"][0]
    for it, std, p in snaps:
        if it == iteration and abs(std - ema_std) < 5e-4:
            return load_toy(p)
    return posthoc_toy(path, ema_std, iteration)


def posthoc_toy(run_dir, ema_std: float, iteration: int | None = None, in_stds=None):
    """Post-hoc EMA (EDM2 Sec. 3.2, Eq. 128-130): the least-squares combination
    of stored snapshots (profiles in_stds, default all stored ones, at every
    iteration <= `iteration`) that best matches profile ema_std at `iteration`."""
    snaps = list_toy_snapshots(run_dir)
    if not snaps:
        raise MissingFileError(f"{run_dir}: no toy-*.safetensors snapshots to reconstruct from")
    iteration = iteration if iteration is not None else snaps[-1][0]
    use = [s for s in snaps if 0 < s[0] <= iteration and (in_stds is None or any(abs(s[1] - v) < 5e-4 for v in in_stds))]
    if not use:
        raise EDM2Error(f"{run_dir}: no snapshots at iteration <= {iteration} with ema_std in {in_stds}")
    nets = [load_toy(p) for _, _, p in use]
    in_t = [m["nimg"] for _, m in nets]
    out_t = iteration * nets[-1][1]["train"]["batch_size"]
    X = solve_posthoc_coefficients(in_t, [s[1] for s in use], out_t, ema_std)[:, 0]
    out, meta = load_toy(use[-1][2])
    state = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in out.state_dict().items()}
    for (net, _), coef in zip(nets, X):
        for k, v in net.state_dict().items():
            state[k] += float(coef) * v.to(torch.float32)
    out.load_state_dict(state)
    meta = dict(meta, iter=iteration, nimg=out_t, ema_std=float(ema_std),
                posthoc={"inputs": [p.name for _, _, p in use]})
    return out, meta
