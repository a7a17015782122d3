"""The EDM2 training loop (paper Sec. 2-3 and Appendix B.2; SPEC §5-§7).

`train(TrainConfig(outdir=...))` trains a `Precond` on a dataset (the
built-in Fashion-MNIST by default) on the CPU, one GPU, or many processes
under torchrun (DDP: gloo on CPUs, NCCL on GPUs). It writes into the run
folder:

    config.json                         the resolved run (compared on resume)
    log.txt, stats.jsonl                status lines, one JSON record per status
    snapshot-<nimg>-<sigma_rel>.safetensors   EMA networks (edm2.snapshot format)
    grid-<nimg>.png                     samples of the longest EMA at each snapshot
    checkpoint-<nimg>.pt                resume state (edm2.checkpoint)
    tensorboard/                        event files, when tensorboard is installed

Re-running the same command resumes from the newest readable checkpoint.
Everything random is a function of (seed, image position): the data order
(one seeded permutation per epoch), each sample's noise level and noise (its
own generator, so results do not depend on how a batch is split over
processes or accumulation rounds), and dropout. So a resumed run is bit for
bit the uninterrupted one on the CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import (archive_run, check_run_folder, checkpoint_name, load_latest_checkpoint,
                         remove_stale_temp_files, save_checkpoint)
from .ema import PowerFunctionEMA
from .encoders import StabilityVAEEncoder, StandardRGBEncoder, VAEUnavailable
from .loss import EDM2Loss, learning_rate_schedule
from .nn import Precond
from .nn.unet import DTYPES
from .presets import get_preset
from .snapshot import atomic_write_bytes, load_network, make_meta, run_fingerprint, save_snapshot, snapshot_name
from .trainlog import Reporter, report_status, save_grid

__all__ = ["TrainConfig", "RunPlan", "TrainResult", "plan_run", "train", "describe",
           "stream_indices", "sample_seed", "SESSION_FIELDS"]


@dataclass
class TrainConfig:
    """What the user asks for. None means "the preset's value" (or automatic).

    Sizes count training images (SPEC §5). `batch` is the global batch;
    `batch_gpu` the micro-batch per process (gradient accumulation when it is
    smaller than batch / processes). `slice` stops this invocation after that
    many images (with a checkpoint); re-running continues.
    """
    outdir: str
    data: str | None = None              # dataset folder/zip; None: built-in Fashion-MNIST
    preset: str = "cpu-32"
    cond: bool | None = None             # None: conditional iff the dataset has labels
    xflip: bool = False                  # x-flip augmentation (doubles the dataset)
    duration: int | None = None
    batch: int | None = None
    batch_gpu: int | None = None
    lr: float | None = None
    decay: float | None = None
    rampup_Mimg: float | None = None
    channels: int | None = None
    dropout: float | None = None
    P_mean: float | None = None
    P_std: float | None = None
    ema_std: tuple | None = None
    status: int | None = None
    snapshot: int | None = None
    checkpoint: int | None = None
    slice: int | None = None
    precision: str = "fp16"              # U-Net dtype on CUDA (fp32 on the CPU whatever this says)
    loss_scaling: float = 1.0
    compile: bool = False
    seed: int = 0
    init: str | None = None              # start from this network (anything load_network accepts)
    device: str | None = None            # default: cuda:LOCAL_RANK if available, else cpu
    workers: int | None = None           # DataLoader workers (default: 2 on CUDA, 0 on the CPU)
    grid: int = 60                       # images in the sample grid at each snapshot (0: none)
    force_new: bool = False              # start over in an outdir that holds a run (old files kept aside)
    progress: bool | None = None         # tqdm bar (None: when stderr is a terminal)


# Fields of RunPlan that may change between invocations of the same run.
SESSION_FIELDS = ("duration", "status", "snapshot", "checkpoint", "slice", "batch_gpu", "compile", "device",
                  "world_size", "workers", "grid")


@dataclass
class RunPlan:
    """The fully resolved run (stored as config.json)."""
    preset: str
    data: str
    cond: bool
    xflip: bool
    net_kwargs: dict
    encoder: dict
    dataset: dict
    batch: int
    lr: float
    decay: float
    rampup_Mimg: float
    P_mean: float
    P_std: float
    ema_std: list
    precision: str
    loss_scaling: float
    seed: int
    init: str | None
    duration: int
    status: int
    snapshot: int
    checkpoint: int
    slice: int | None
    batch_gpu: int
    compile: bool
    device: str
    world_size: int
    workers: int
    grid: int

    def identity(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in SESSION_FIELDS}


@dataclass
class TrainResult:
    outdir: Path
    nimg: int                      # images trained when this invocation ended
    finished: bool                 # nimg reached the duration
    snapshots: list = field(default_factory=list)   # snapshot files written by this invocation
    checkpoint: Path | None = None  # the last checkpoint written


# ---------------------------------------------------------------------------
# Resolving and checking (nothing is written before these pass).
# ---------------------------------------------------------------------------

def _pick(value, default):
    return default if value is None else value


def plan_run(config: TrainConfig, world_size: int = 1, device: str = "cpu"):
    """Open the dataset and merge the preset with the overrides -> (RunPlan, ImageDataset).
    Raises ValueError / FileNotFoundError naming the option and the fix."""
    from .data import ImageDataset, builtin_dataset_path
    from .units import parse_float_list

    preset = get_preset(config.preset)
    batch = int(_pick(config.batch, preset.batch))
    if batch < 1:
        raise ValueError(f"--batch {batch}: must be >= 1")
    if batch % world_size:
        raise ValueError(f"--batch {batch}: not divisible by the {world_size} processes; pick a multiple of {world_size}")
    per_rank = batch // world_size
    batch_gpu = int(_pick(config.batch_gpu, per_rank))
    if batch_gpu < 1 or per_rank % batch_gpu:
        raise ValueError(f"--batch-gpu {batch_gpu}: must divide the per-process batch {per_rank} "
                         f"(--batch {batch} over {world_size} processes)")
    sizes = dict(duration=_pick(config.duration, preset.duration), status=_pick(config.status, preset.status),
                 snapshot=_pick(config.snapshot, preset.snapshot), checkpoint=_pick(config.checkpoint, preset.checkpoint))
    if config.slice is not None:
        sizes["slice"] = config.slice
    for name, value in sizes.items():
        if value < 1 or value % batch:
            raise ValueError(f"--{name} {value}: must be a positive multiple of --batch {batch} "
                             f"(e.g. {max(value // batch, 1) * batch})")
    if config.precision not in DTYPES:
        raise ValueError(f"--precision {config.precision!r}: allowed: {', '.join(DTYPES)}")
    if config.seed < 0:
        raise ValueError(f"--seed {config.seed}: must be >= 0")
    ema_std = parse_float_list(_pick(config.ema_std, preset.ema_std), "--ema-std")
    PowerFunctionEMA(torch.nn.Linear(1, 1), ema_std)  # validates the widths

    # Data: pixels (1 or 3 channels) or 8-channel VAE latents (SPEC §9).
    path = Path(config.data) if config.data is not None else builtin_dataset_path()
    ds = ImageDataset(path, xflip=config.xflip, use_labels=config.cond is not False)
    if config.cond and not ds.has_labels:
        raise ValueError(f"--cond: dataset {path} has no labels (no dataset.json with labels); "
                         f"use --uncond or add labels with `edm2 dataset convert`")
    if ds.is_latent:
        encoder, channels = StabilityVAEEncoder(), 4
    elif ds.num_channels in (1, 3):
        encoder, channels = StandardRGBEncoder(), ds.num_channels
    else:
        raise ValueError(f"dataset {path}: {ds.num_channels}-channel items are not supported; "
                         f"use 1 (grey) or 3 (RGB) channel images or 8-channel latents")
    _check_items(ds)
    dataset = dict(resolution=ds.resolution, channels=channels, label_dim=ds.label_dim,
                   class_names=ds.class_names, path=str(path.resolve()), size=ds.raw_size, xflip=ds.xflip)

    # Network: the preset's architecture, or that of --init (fine-tuning).
    if config.init is not None:
        init_net, init_meta = load_network(config.init)
        net_kwargs = dict(init_meta["net_kwargs"])
        for name, want in (("img_resolution", ds.resolution), ("img_channels", channels), ("label_dim", ds.label_dim)):
            if net_kwargs.get(name) != want:
                raise ValueError(f"--init {config.init}: the network has {name}={net_kwargs.get(name)} but the "
                                 f"dataset needs {want}; pick a network trained on data like {path}")
        if config.channels is not None or config.dropout is not None:
            raise ValueError("--channels/--dropout cannot change the architecture of an --init network; drop them")
    else:
        net_kwargs = preset.replace(model_channels=_pick(config.channels, preset.model_channels),
                                    dropout=_pick(config.dropout, preset.dropout)).net_kwargs(ds.label_dim)
        net_kwargs.update(img_resolution=ds.resolution, img_channels=channels)
    net_kwargs.update(use_fp16=config.precision != "fp32",
                      reduced_dtype=config.precision if config.precision != "fp32" else "fp16")
    with torch.device("meta"):
        Precond(**net_kwargs)  # ValueError for an impossible architecture

    on_cuda = torch.device(device).type == "cuda"
    plan = RunPlan(
        preset=preset.name, data=str(path.resolve()), cond=ds.has_labels, xflip=config.xflip,
        net_kwargs=net_kwargs, encoder=encoder.to_meta(), dataset=dataset, batch=batch,
        lr=float(_pick(config.lr, preset.lr)), decay=float(_pick(config.decay, preset.decay)),
        rampup_Mimg=float(_pick(config.rampup_Mimg, preset.rampup_Mimg)),
        P_mean=float(_pick(config.P_mean, preset.P_mean)), P_std=float(_pick(config.P_std, preset.P_std)),
        ema_std=ema_std, precision=config.precision, loss_scaling=float(config.loss_scaling), seed=config.seed,
        init=config.init, duration=sizes["duration"], status=sizes["status"], snapshot=sizes["snapshot"],
        checkpoint=sizes["checkpoint"], slice=config.slice, batch_gpu=batch_gpu, compile=config.compile,
        device=str(device), world_size=world_size, workers=_pick(config.workers, 2 if on_cuda else 0),
        grid=config.grid)
    return plan, ds


def _check_items(ds, limit: int = 2000) -> None:
    """Decode every item of a small dataset (or the first `limit`) now, so that an
    unreadable file is reported before anything is written."""
    for i in range(min(ds.raw_size, limit)):
        ds[i]


def describe(plan: RunPlan, mode: str | None = None) -> str:
    """The resolved configuration and the network size, as text (--dry-run)."""
    with torch.device("meta"):
        net = Precond(**plan.net_kwargs)
    n_params = sum(p.numel() for p in net.parameters())
    lines = [json.dumps(dataclasses.asdict(plan), indent=2),
             f"network: {n_params:,} parameters ({n_params * 4 / 2 ** 20:.1f} MiB in fp32)",
             f"steps: {plan.duration // plan.batch:,} of {plan.batch} images"]
    if mode:
        lines.append(f"run folder: {mode}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Deterministic randomness: functions of (seed, image position).
# ---------------------------------------------------------------------------

def sample_seed(seed: int, stream: int, position: int) -> int:
    """A 63-bit generator seed for (seed, stream, position), well mixed."""
    return int(np.random.SeedSequence([seed, stream, position]).generate_state(1, np.uint64)[0]) >> 1


def stream_indices(size: int, seed: int, positions, cache: dict | None = None) -> list[int]:
    """Dataset index of every training-stream position: epoch e = p // size is
    a seeded permutation of the dataset, position p takes its element p % size.
    `cache` (a dict) keeps the permutations between calls."""
    perms = {} if cache is None else cache
    out = []
    for p in positions:
        e = p // size
        if e not in perms:
            g = torch.Generator().manual_seed(sample_seed(seed, 0, e))
            if len(perms) >= 2:
                perms.pop(min(perms))
            perms[e] = torch.randperm(size, generator=g).tolist()
        out.append(perms[e][p % size])
    return out


class _StreamSampler(torch.utils.data.Sampler):
    """Micro-batches of dataset indices of this process, from image `start` on:
    each step of `batch` images gives rank r the positions
    [nimg + r*batch/world, nimg + (r+1)*batch/world), cut into micro-batches."""

    def __init__(self, size, seed, start, batch, batch_gpu, rank, world):
        self.args = size, seed, start, batch, batch_gpu, rank, world

    def __iter__(self):
        size, seed, nimg, batch, batch_gpu, rank, world = self.args
        per_rank, cache = batch // world, {}
        while True:
            for r in range(per_rank // batch_gpu):
                first = nimg + rank * per_rank + r * batch_gpu
                yield stream_indices(size, seed, range(first, first + batch_gpu), cache)
            nimg += batch


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------

def train(config: TrainConfig, dry_run: bool = False) -> TrainResult | str:
    """Train (or resume) the run in config.outdir; see the module docstring.

    Under torchrun every process calls this; rank 0 writes the files.
    With dry_run, nothing is trained or written: returns `describe()`'s text.
    """
    from .generate import default_device, init_distributed

    created_group = not (dist.is_available() and dist.is_initialized())
    rank, world = init_distributed() if not dry_run else (0, 1)
    created_group = created_group and world > 1
    try:
        return _train(config, rank, world, dry_run,
                      torch.device(config.device) if config.device else default_device())
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, rank: int, world: int, dry_run: bool, device: torch.device):
    plan, ds = plan_run(config, world, str(device))
    out = Path(config.outdir)
    mode = check_run_folder(plan.identity(), out, config.force_new)
    if dry_run:
        return describe(plan, mode)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False   # SPEC §5: no TF32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    elif world > 1:  # share the cores between the processes of this node
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))

    # The run folder: rank 0 prepares it, the others wait.
    if rank == 0:
        if mode == "archive":
            archive_run(out)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)
        if mode != "resume":
            atomic_write_bytes(out / "config.json", json.dumps(plan.identity(), indent=2).encode())
    if world > 1:
        dist.barrier()
    progress = sys.stderr.isatty() if config.progress is None else config.progress
    bar = None
    rep = Reporter(out, rank == 0)

    # Network, optimizer (SPEC §5), EMA (SPEC §7, rank 0 only), resume state.
    torch.manual_seed(sample_seed(plan.seed, 3, 0))
    net = Precond(**plan.net_kwargs).to(device).train().requires_grad_(True)
    if plan.init is not None:
        net.load_state_dict(load_network(plan.init)[0].state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=0.0, betas=(0.9, 0.99), eps=1e-8)
    ema = PowerFunctionEMA(net, plan.ema_std) if rank == 0 else None
    state, ckpt_path = load_latest_checkpoint(out, map_location=device, warn=rep.log) if mode == "resume" else (None, None)
    cur_nimg = 0
    if state is not None:
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        cur_nimg = int(state["nimg"])
        rep.log(f"resuming from {ckpt_path.name} at {cur_nimg} images")
        del state
    start_nimg = cur_nimg
    fresh = start_nimg == 0
    stop_nimg = plan.duration if plan.slice is None else min(plan.duration, start_nimg + plan.slice)
    if cur_nimg >= stop_nimg:
        rep.log(f"nothing to do: the run in {out} is at {cur_nimg} images of --duration {plan.duration}")
        rep.close()
        return TrainResult(outdir=out, nimg=cur_nimg, finished=True)
    n_params = sum(p.numel() for p in net.parameters())
    rep.log(f"run {out}: {plan.preset}, {n_params:,} parameters, data {plan.data} ({len(ds)} items, "
            f"{plan.dataset['channels']}x{ds.resolution}x{ds.resolution}, label_dim {ds.label_dim}), "
            f"batch {plan.batch} ({world} process(es) x {plan.batch_gpu} x {plan.batch // world // plan.batch_gpu} "
            f"round(s)), device {device}, images {start_nimg} -> {stop_nimg} of {plan.duration}")

    model = ddp = None
    if world > 1:
        model = ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    model = model or net
    if plan.compile:
        model = torch.compile(model)
    loss_fn = EDM2Loss(P_mean=plan.P_mean, P_std=plan.P_std, sigma_data=net.sigma_data)
    encoder = StabilityVAEEncoder(**{k: v for k, v in plan.encoder.items() if k != "type"}) \
        if plan.encoder["type"] == StabilityVAEEncoder.kind else StandardRGBEncoder()
    sampler = _StreamSampler(len(ds), plan.seed, cur_nimg, plan.batch, plan.batch_gpu, rank, world)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=plan.workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=2 if plan.workers else None)
    per_rank, rounds = plan.batch // world, plan.batch // world // plan.batch_gpu
    dataset_meta = {k: plan.dataset[k] for k in ("resolution", "channels", "label_dim", "class_names", "path")}
    origin = {"preset": plan.preset, "run": str(out.resolve()), "seed": plan.seed, "tool": "edm2 train",
              "run_id": run_fingerprint(plan.identity())}  # post-hoc EMA refuses to mix runs
    result = TrainResult(outdir=out, nimg=cur_nimg, finished=False)
    grid = plan.grid

    if rank == 0:
        bar = tqdm(total=stop_nimg - start_nimg, unit="img", disable=not progress, dynamic_ncols=True)
        rep.bar = bar
    data_iter = iter(loader)
    loss_sum = torch.zeros([], dtype=torch.float64, device=device)
    loss_count = 0
    t_last, nimg_last, t_maint = time.time(), cur_nimg, 0.0
    try:
        while True:
            done = cur_nimg >= stop_nimg
            t0 = time.time()
            # Status (SPEC §6 default: every 128Ki images).
            if cur_nimg % plan.status == 0 or done:
                t_last, nimg_last, loss_sum, loss_count = report_status(
                    rep, plan, cur_nimg, t_last, nimg_last, t_maint, loss_sum, loss_count, device, world)
                t_maint = 0.0
            # Snapshots of every EMA profile (also at image 0 of a fresh run) and a sample grid.
            if rank == 0 and (cur_nimg % plan.snapshot == 0 or cur_nimg == plan.duration) \
                    and (cur_nimg != start_nimg or fresh):
                for std, ema_net in ema.nets.items():
                    path = out / snapshot_name(cur_nimg, std)
                    save_snapshot(path, ema_net, make_meta(plan.net_kwargs, cur_nimg, std, plan.encoder,
                                                           dataset_meta, origin))
                    result.snapshots.append(path)
                if grid and cur_nimg > 0:  # (a grid of the untrained network would be noise)
                    try:
                        save_grid(out / f"grid-{cur_nimg:012d}.png", ema.nets[max(ema.nets)], encoder, grid, device)
                    except VAEUnavailable as e:
                        rep.log(f"no sample grids: {e}")
                        grid = 0
                    for m in ema.nets.values():
                        m.eval()  # drops the MPConv weight caches
            # Resume checkpoint (and at the end of this invocation).
            if rank == 0 and cur_nimg != start_nimg and (cur_nimg % plan.checkpoint == 0 or done):
                path = out / checkpoint_name(cur_nimg)
                save_checkpoint(path, {"net": net.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state_dict(),
                                       "nimg": cur_nimg, "seed": plan.seed, "data_position": cur_nimg})
                result.checkpoint = path
            t_maint += time.time() - t0
            if done:
                break

            # One optimizer step over `batch` images (SPEC §5).
            lr = learning_rate_schedule(cur_nimg, plan.batch, plan.lr, plan.decay, plan.rampup_Mimg)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            for r in range(rounds):
                first = cur_nimg + rank * per_rank + r * plan.batch_gpu
                images, labels = _next_batch(data_iter)
                gens = [torch.Generator(device).manual_seed(sample_seed(plan.seed, 1, first + i))
                        for i in range(len(images))]
                torch.manual_seed(sample_seed(plan.seed, 2, first))  # dropout masks
                images = images.to(device, non_blocking=True)
                if ds.is_latent:  # one posterior sample per item, from the item's own generator (SPEC §9)
                    x = torch.cat([encoder.encode_latents(images[i:i + 1], g) for i, g in enumerate(gens)])
                else:
                    x = encoder.encode_latents(images)
                labels = labels.to(device) if ds.label_dim else None
                sync = ddp.no_sync() if ddp is not None and r < rounds - 1 else contextlib.nullcontext()
                with sync:
                    loss = loss_fn(model, x, labels, generator=gens)
                    loss.sum().mul(plan.loss_scaling / per_rank).backward()
                loss_sum += loss.detach().sum().double()
                loss_count += loss.numel()
            for p in net.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
            opt.step()
            cur_nimg += plan.batch
            if ema is not None:
                ema.update(net, cur_nimg, plan.batch)
            if bar is not None:
                bar.update(plan.batch)
    finally:
        if bar is not None:
            bar.close()
        rep.close()
    result.nimg = cur_nimg
    result.finished = cur_nimg >= plan.duration
    return result


def _next_batch(data_iter):
    """The next micro-batch; a data error (possibly from a worker) becomes one line."""
    try:
        return next(data_iter)
    except ValueError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise ValueError(lines[-1] if lines else str(e)) from None
