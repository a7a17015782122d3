"""Training of the toy denoiser against the exact ground-truth score, with
power-function EMA snapshots and their post-hoc reconstruction (EDM2 Sec. 3.1).

Loss (autoguidance paper, toy example; EDM2 Eq. 2 for small sigma):
    E_{sigma, x ~ p(x; sigma)} sigma^2 |s_theta(x; sigma) - grad log p(x; sigma)|^2,
ln sigma ~ N(P_mean, P_std^2); Adam(0.9, 0.99); learning rate ref_lr /
sqrt(max(iter / ref_iters, 1)) (EDM2 Eq. 121, edm2.loss.learning_rate_schedule).
Time is counted in training points ("nimg" = iterations x batch) like the
image trainer, so the EMA profiles, their snapshot files
(snapshot-<nimg>-<sigma_rel>.safetensors, written by `edm2.ema.PowerFunctionEMA`)
and the post-hoc reconstruction (`edm2.ema.reconstruct_state_dict`) are the image
trainer's too.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import tqdm

from ..ema.posthoc import MAX_PROFILE_ERROR
from ..ema.profiles import check_sigma_rel
from ..ema.trackers import PowerFunctionEMA, reconstruct_state_dict
from ..io.snapshot import list_snapshots
from ..loss import learning_rate_schedule
from ..utils.errors import EDM2Error, ExistingFileError, MissingFileError
from ..utils.fileio import atomic_write_bytes
from .gmm import CLASSES, tree_mixture
from .model import ToyNet, ToyNetConfig, load_toy, toy_snapshot_meta


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
    sigma_rels: tuple = (0.010, 0.050, 0.100)  # tracked power-function EMA profiles; first = default
    snapshot_iters: int = 256          # 0 = only the final snapshot
    seed: int = 0
    threads: int = 1                   # torch intra-op threads while training (0 = leave torch's setting);
                                       # the ops are small, and on a busy CPU extra threads only contend

    def check(self):
        if self.classes not in CLASSES:
            raise EDM2Error(f"classes={self.classes!r}: choose one of A, B, AB")
        if self.iters < 1 or self.batch_size < 1:
            raise EDM2Error(f"iters={self.iters} and batch_size={self.batch_size} must be >= 1")
        if not 1 <= self.sigma_groups <= self.batch_size or self.batch_size % self.sigma_groups:
            raise EDM2Error(f"sigma_groups={self.sigma_groups} must divide batch_size={self.batch_size}")
        if self.snapshot_iters < 0:
            raise EDM2Error(f"snapshot_iters={self.snapshot_iters} must be >= 0")
        if not self.sigma_rels:
            raise EDM2Error("`sigma_rels`: track at least one EMA profile")
        if len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise EDM2Error(f"sigma_rels={list(self.sigma_rels)}: every value must be different")
        check_sigma_rel(list(self.sigma_rels), "sigma_rels", distinct=True)  # range; one file name each
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
        return self.emas[self.config.sigma_rels[0]]


def list_toy_snapshots(folder) -> list[tuple[int, float, Path]]:
    """(nimg, sigma_rel, path) of the EMA snapshots in a toy run folder, sorted.
    A folder of the toy's former format (toy-*.safetensors) is refused."""
    folder = Path(folder)
    out = [(n, s, p) for n, s, p in list_snapshots(folder) if s is not None]
    if not out and any(folder.glob("toy-*-*.safetensors")):
        raise EDM2Error(f"{folder}: a toy run in the former toy-<iter>-<sigma_rel>.safetensors format, "
                        f"written by an older edm2; retrain with `edm2 toy train`")
    return out


def train_toy(config: ToyTrainConfig, outdir=None, progress: bool = True) -> ToyRun:
    """Train one toy model; with outdir, write EMA snapshots every
    config.snapshot_iters iterations (and at the end) plus training.json."""
    config.check()
    if outdir is not None:
        outdir = Path(outdir)
        if outdir.exists() and (list_snapshots(outdir) or any(outdir.glob("toy-*-*.safetensors"))
                                or (outdir / "training.json").exists()):
            raise ExistingFileError(f"outdir={outdir}: already holds a toy run; choose a new folder")
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
    tracker = PowerFunctionEMA(net, config.sigma_rels, meta=toy_snapshot_meta(net, config.classes, asdict(config)))
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
        # Power-function EMA (EDM2 Eq. 127), time in points seen after this step.
        tracker.update(net, (it + 1) * B, B)
        last = it + 1 == config.iters
        if outdir is not None and (last or (config.snapshot_iters and (it + 1) % config.snapshot_iters == 0)):
            snapshots += tracker.save_snapshots(outdir)
    seconds = time.perf_counter() - start
    final_loss = float(np.mean(losses[-min(len(losses), 64):]))
    run = ToyRun(config, net.eval().requires_grad_(False), tracker.nets, seconds, final_loss, snapshots)
    if outdir is not None:
        info = {"config": asdict(config), "seconds": seconds, "final_loss": final_loss,
                "snapshots": [p.name for p in snapshots]}
        atomic_write_bytes(outdir / "training.json", (json.dumps(info, indent=2) + "\n").encode())
    return run


def load_toy_run(source, sigma_rel: float | None = None, iteration: int | None = None):
    """A toy net from a snapshot file or a run folder -> (ToyNet, meta).

    For a folder: the snapshot at `iteration` (default the last) with profile
    `sigma_rel` (default the run's first tracked one); a profile that was not
    tracked is reconstructed post hoc from the stored ones (posthoc_toy)."""
    path = Path(source)
    if path.is_file():
        if sigma_rel is not None or iteration is not None:
            raise EDM2Error(f"{path}: `sigma_rel`/`iteration` select inside a run folder; pass the folder "
                            f"instead of a file")
        return load_toy(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: no such toy snapshot or run folder")
    snaps = list_toy_snapshots(path)
    if not snaps:
        raise MissingFileError(f"{path}: no snapshot-*.safetensors of a toy run (`edm2 toy train` / train_toy write them)")
    last = load_toy(snaps[-1][2])[1]
    nimg = snaps[-1][0] if iteration is None else int(iteration) * last["train"]["batch_size"]
    if sigma_rel is None:
        sigma_rel = last["train"]["sigma_rels"][0]
    for n, s, p in snaps:
        if n == nimg and abs(s - sigma_rel) < 5e-4:
            return load_toy(p)
    return posthoc_toy(path, sigma_rel, iteration)


def posthoc_toy(run_dir, sigma_rel: float, iteration: int | None = None, in_sigma_rels=None,
                max_profile_error=MAX_PROFILE_ERROR):
    """Post-hoc EMA (EDM2 Sec. 3.2, Eq. 128-130): the least-squares combination
    of stored snapshots (profiles in_sigma_rels, default all stored ones, at every
    iteration <= `iteration`, default the last) that best matches profile sigma_rel
    at `iteration`, by `edm2.ema.reconstruct_state_dict` -> (ToyNet, meta).
    max_profile_error: the largest relative L2 profile error accepted (None: no check)."""
    snaps = list_toy_snapshots(run_dir)
    if not snaps:
        raise MissingFileError(f"{run_dir}: no snapshot-*.safetensors to reconstruct from")
    net, meta = load_toy(snaps[-1][2])
    batch = meta["train"]["batch_size"]
    nimg = snaps[-1][0] if iteration is None else int(iteration) * batch
    reconstruct_state_dict(run_dir, float(sigma_rel), at=nimg, model=net, in_sigma_rels=in_sigma_rels,
                           max_profile_error=max_profile_error)
    used = sorted({s for n, s, _ in snaps if n <= nimg and (in_sigma_rels is None
                                                            or any(abs(s - v) < 5e-4 for v in in_sigma_rels))})
    meta = dict(meta, iter=nimg // batch, nimg=nimg, ema_std=float(sigma_rel),
                posthoc={"in_sigma_rels": used, "inputs": [p.name for n, s, p in snaps if n <= nimg and s in used]})
    return net, meta
