"""The EDM2 training loop (paper Sec. 2-3, App. B.2, B.5, C.3-C.5, D.2).

`train(TrainConfig(outdir=...))` trains a `Precond` on a dataset (the
built-in Fashion-MNIST by default) on the CPU, one GPU, or many processes
under torchrun (DDP: gloo on CPUs, NCCL on GPUs). It writes into the run
folder:

    config.json                         the resolved run (compared on resume)
    log.txt, stats.jsonl                status lines, one JSON record per status
    snapshot-<nimg>-<sigma_rel>.safetensors   EMA networks (edm2.io.snapshot format)
    grid-<nimg>.png                     samples of the longest EMA at each snapshot
    checkpoint-<nimg>.pt                resume state (edm2.train.checkpoint)
    tensorboard/                        event files, with --log tensorboard

Re-running the same command resumes from the newest readable checkpoint.
Everything random is a function of (seed, stream, position), see `Stream`:
the data order (one seeded permutation per epoch), each sample's noise level
and noise (its own generator, so results do not depend on how a batch is
split over processes or accumulation rounds), dropout and the initial
weights. So a resumed run is bit for bit the uninterrupted one on the CPU.

The code reads top to bottom: `setup` builds a `Run` (network, optimizer, EMA,
loss, data, run folder, reporter and status meter), `train_loop` repeats
learning rate -> maintenance (status, snapshots, checkpoint) -> one step ->
EMA -> count, each a small function of the `Run`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..analysis.dynamics import DynamicsHook
from ..data import ImageDataset, builtin_dataset_path
from ..ema.profiles import check_sigma_rel
from ..ema.trackers import PowerFunctionEMA, TraditionalEMA
from ..encoders import StabilityVAEEncoder, StandardRGBEncoder, VAEUnavailable, encoder_from_meta
from ..io.loading import load_network
from ..io.snapshot import list_snapshots, make_meta, run_fingerprint, save_snapshot, snapshot_config, snapshot_name
from ..loss import EDM2Loss, EDMLoss, learning_rate_schedule
from ..nn import Precond, build_network, check_precision, force_normalize_
from ..nn.adm import adm_net_kwargs
from ..nn.denoiser import check_dropout
from ..presets import RECIPES, get_preset, traditional_ema_halflife
from ..utils.distributed import configure_threads, init_distributed, resolve_device
from ..utils.errors import EDM2Error
from ..utils.fileio import LockError, RunLock, atomic_write_bytes
from ..utils.units import parse_float_list
from .checkpoint import (
    ADDED_KEYS,
    archive_run,
    check_restart,
    check_run_folder,
    checkpoint_name,
    dataset_fingerprint,
    list_checkpoints,
    load_latest_checkpoint,
    read_run_config,
    remove_stale_temp_files,
    save_checkpoint,
)
from .config import TrainConfig, kept_on_resume, may_change_on_resume
from .log import Reporter, StatusMeter, check_grid_owner, parse_log_backends, save_grid
from .speed import to_channels_last


def _resolved(help: str, resume: bool = False, kept: bool = False) -> dataclasses.Field:
    """A RunPlan field that TrainConfig does not have: resolved from the preset, the data or the processes.
    `kept`: see `edm2.train.config.kept_on_resume`."""
    return field(metadata=dict(help=help, resume=resume, key=None, kept=kept))


# The plan's fields beyond TrainConfig's (whose `plan=True` fields it holds, resolved).
_RESOLVED_FIELDS = [
    ("loss", str, _resolved("the config's loss: 'uncertainty' (Eq. 21) or 'edm' (Eq. 14)")),
    ("adam_beta2", float, _resolved("Adam's beta2 of the config (App. B.2)")),
    ("ema", str, _resolved("'power' (power-function profiles, sigma_rel) or 'traditional' (ema_halflife)")),
    ("ema_halflife", float, _resolved("traditional EMA: half-life in images, from the run's duration when it "
                                      "starts (edm2.presets.traditional_ema_halflife); kept on resume", kept=True)),
    ("ema_rampup_ratio", float, _resolved("traditional EMA: EDM's ramp-up")),
    ("net_kwargs", dict, _resolved("Precond arguments (edm2.nn.build_network)")),
    ("encoder", dict, _resolved("the encoder's metadata (edm2.encoders.encoder_from_meta)")),
    ("dataset", dict, _resolved("the dataset: resolution, channels, labels, path, size")),
    ("data_fingerprint", str, _resolved("the dataset's content (edm2.train.checkpoint.dataset_fingerprint); "
                                        "None for a run started before edm2 stored it")),
    ("world_size", int, _resolved("processes", resume=True)),
]


def _plan_key(f: dataclasses.Field) -> str:
    """The config.json key of a RunPlan field (its name unless the field says otherwise)."""
    return f.metadata.get("key") or f.name


def _identity(self) -> dict:
    """The settings that define the run (a resume refuses a change of any), under
    their config.json keys: what config.json stores and `check_run_folder` compares."""
    values = dataclasses.asdict(self)
    return {_plan_key(f): values[f.name] for f in dataclasses.fields(self)
            if not may_change_on_resume(f) and not (_plan_key(f) in ADDED_KEYS and values[f.name] is None)}


def _as_dict(self) -> dict:
    """Every setting of the plan, under its config.json key."""
    values = dataclasses.asdict(self)
    return {_plan_key(f): values[f.name] for f in dataclasses.fields(self)}


RunPlan = dataclasses.make_dataclass(
    "RunPlan",
    [(f.name, f.type, field(metadata=f.metadata)) for f in dataclasses.fields(TrainConfig) if f.metadata["plan"]]
    + _RESOLVED_FIELDS,
    namespace={"identity": _identity, "as_dict": _as_dict, "__module__": __name__,
               "__doc__": "The fully resolved run: TrainConfig's `plan` fields with every None resolved, and the "
                          "settings resolved from the preset, the data and the processes. `identity()` (the "
                          "fields that may not change on resume) is stored as config.json."})

# Fields of RunPlan that may change between invocations of the same run (derived from the field metadata).
SESSION_FIELDS = tuple(f.name for f in dataclasses.fields(RunPlan) if may_change_on_resume(f))


@dataclass
class TrainResult:
    outdir: Path
    nimg: int                      # images trained when this invocation ended
    finished: bool                 # nimg reached the duration
    snapshots: list = field(default_factory=list)   # snapshot files written by this invocation
    checkpoint: Path | None = None  # the last checkpoint written


# ---------------------------------------------------------------------------
# Resolving and checking (nothing is written before these pass). Errors name
# the Python argument (`batch=3: ...`); `edm2 train` shows the flag instead.
# ---------------------------------------------------------------------------

def _pick(value, default):
    return default if value is None else value


def plan_run(config: TrainConfig, world_size: int = 1, device: str = "cpu"):
    """Open the dataset and merge the preset with the overrides -> (RunPlan, ImageDataset).
    Raises `EDM2Error` (a ValueError; `MissingFileError` for a missing dataset) naming the argument and the fix."""
    preset = get_preset(config.preset, config.config)
    sizes = _resolve_sizes(config, preset, world_size)
    values = _check_values(config, preset)
    sigma_rel = _check_sigma_rel(config, preset)
    ds, encoder, dataset = _open_dataset(config)
    net_kwargs = _resolve_net_kwargs(config, preset, ds, dataset["channels"])
    on_cuda = torch.device(device).type == "cuda"
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig) if f.metadata["plan"]}
    settings.update({name: value for name, value in {**values, **sizes}.items() if name in settings})
    traditional = preset.ema == "traditional"
    halflife = traditional_ema_halflife(sizes["duration"]) if traditional else preset.ema_halflife
    settings.update(
        preset=preset.name, config=preset.config, loss=preset.loss, adam_beta2=preset.adam_beta2, ema=preset.ema,
        ema_halflife=halflife, ema_rampup_ratio=preset.ema_rampup_ratio, data=dataset["path"],
        cond=ds.has_labels, net_kwargs=net_kwargs, encoder=encoder.to_meta(), dataset=dataset, sigma_rel=sigma_rel,
        device=str(device), world_size=world_size, workers=_pick(config.workers, 2 if on_cuda else 0),
        data_fingerprint=dataset_fingerprint(dataset["path"]))
    plan = _as_stored(RunPlan(**settings), config)
    if traditional:
        _check_halflife(plan)
    return plan, ds


def _as_stored(plan: RunPlan, config: TrainConfig) -> RunPlan:
    """The plan of a resume: the values fixed when the run started (`kept_on_resume`)
    taken from its config.json, and the settings its config.json lacks (`ADDED_KEYS`)
    left out. A new run (no readable config.json, or force_new) keeps the plan as is."""
    stored = None if config.force_new else read_run_config(Path(config.outdir))
    if stored is None:
        return plan
    same_kind = stored.get("config") == plan.config and stored.get("ema") == plan.ema   # else: another run
    changes = {f.name: stored[_plan_key(f)] for f in dataclasses.fields(RunPlan)
               if same_kind and kept_on_resume(f) and _plan_key(f) in stored}
    changes.update({f.name: None for f in dataclasses.fields(RunPlan)
                    if _plan_key(f) in ADDED_KEYS and _plan_key(f) not in stored})
    return dataclasses.replace(plan, **changes)


# The real-valued settings: (low, high, low allowed, what the value must be); high is never allowed.
_RANGES = {"lr": (0, math.inf, False, "a finite number > 0"),
           "decay": (0, math.inf, True, "a finite number >= 0"),
           "rampup_Mimg": (0, math.inf, True, "a finite number >= 0"),
           "P_mean": (-math.inf, math.inf, False, "a finite number"),
           "P_std": (0, math.inf, False, "a finite number > 0"),
           "loss_scaling": (0, math.inf, False, "a finite number > 0")}


def _check_values(config: TrainConfig, preset) -> dict:
    """The real-valued settings (the override, else the preset's), each checked
    finite and in range; also the whole-number and string settings."""
    values = {}
    for name, (low, high, low_ok, must) in _RANGES.items():
        given = getattr(config, name)
        value = float(_pick(given, getattr(preset, name, None)))
        if not ((low < value or (low_ok and value == low)) and value < high):
            where = "" if given is not None else f" (from preset {preset.name})"
            raise EDM2Error(f"{name}={value}{where}: must be {must}")
        values[name] = value
    values["dropout"] = check_dropout("dropout", float(_pick(config.dropout, preset.dropout)))
    check_precision("precision", config.precision)
    for name in ("seed", "workers", "grid", "threads", "channels", "dynamics", "dynamics_probe"):
        value = getattr(config, name)
        low = 1 if name in ("threads", "channels", "dynamics", "dynamics_probe") else 0
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise EDM2Error(f"{name}={value!r}: must be a whole number >= {low}")
    return values


def _check_sigma_rel(config: TrainConfig, preset) -> list:
    """The EMA lengths sigma_rel: different values, each in (0, 0.2887) (paper Sec. 3.1)."""
    if preset.ema == "traditional":
        if config.sigma_rel is not None:
            raise EDM2Error(f"sigma_rel={','.join(map(str, config.sigma_rel))}: config {preset.config} keeps a "
                            f"traditional EMA (half-life {preset.ema_halflife:.4g} images), not power-function "
                            f"profiles; drop `sigma_rel`, or pick a config B-G (allowed with `sigma_rel`: B, C, D, "
                            f"E, F, G)")
        return []
    sigma_rel = parse_float_list(_pick(config.sigma_rel, preset.sigma_rel), "sigma_rel")
    check_sigma_rel(sigma_rel, "sigma_rel", distinct=True)  # different snapshot file names too
    return sigma_rel


def _resolve_sizes(config: TrainConfig, preset, world_size: int) -> dict:
    """batch, batch_gpu and the image counts, checked against each other."""
    batch = int(_pick(config.batch, preset.batch))
    if batch < 1:
        raise EDM2Error(f"batch={batch}: must be >= 1")
    if batch % world_size:
        raise EDM2Error(f"batch={batch}: not divisible by the {world_size} processes; "
                         f"pick a multiple of {world_size}")
    per_rank = batch // world_size
    batch_gpu = int(_pick(config.batch_gpu, per_rank))
    if batch_gpu < 1 or per_rank % batch_gpu:
        raise EDM2Error(f"batch_gpu={batch_gpu}: must divide the per-process batch {per_rank} "
                         f"(batch={batch} over {world_size} processes)")
    sizes = {name: _pick(getattr(config, name), getattr(preset, name))
             for name in ("duration", "status", "snapshot", "checkpoint")}
    if config.slice is not None:
        sizes["slice"] = config.slice
    for name, value in sizes.items():
        if value < 1 or value % batch:
            raise EDM2Error(f"{name}={value}: must be a positive multiple of batch={batch} "
                             f"(e.g. {max(value // batch, 1) * batch})")
    return dict(sizes, batch=batch, batch_gpu=batch_gpu)


def _check_halflife(plan) -> None:
    """Config A's EMA half-life (paper App. B.1, scaled to the run's duration when it
    started) must be at least 1 image, which needs a duration of 43 images or more."""
    if not plan.ema_halflife >= 1:
        shortest = next(n for n in range(plan.batch, 2 ** 40, plan.batch) if traditional_ema_halflife(n) >= 1)
        raise EDM2Error(f"duration={plan.duration}: config A's EMA half-life, the paper's fraction 50M/2147.5M "
                        f"of the duration (App. B.1), would be {plan.ema_halflife:.3g} images, below 1; use "
                        f"duration={shortest} or more")


def _open_dataset(config: TrainConfig):
    """The dataset -> (ImageDataset, encoder, dataset description). Pixels (1 or
    3 channels) or 8-channel VAE latents (App. B.1)."""
    path = Path(config.data) if config.data is not None else builtin_dataset_path()
    ds = ImageDataset(path, xflip=config.xflip, use_labels=config.cond is not False)
    if config.cond and not ds.has_labels:
        raise EDM2Error(f"cond=True: dataset {path} has no labels (no dataset.json with labels); "
                         f"use cond=False or add labels with `edm2 dataset convert`")
    if ds.is_latent:
        encoder, channels = StabilityVAEEncoder(), 4
    elif ds.num_channels in (1, 3):
        encoder, channels = StandardRGBEncoder(), ds.num_channels
    else:
        raise EDM2Error(f"dataset {path}: {ds.num_channels}-channel items are not supported; "
                         f"use 1 (grey) or 3 (RGB) channel images or 8-channel latents")
    _check_items(ds)
    dataset = dict(resolution=ds.resolution, channels=channels, label_dim=ds.label_dim,
                   class_names=ds.class_names, path=str(path.resolve()), size=ds.raw_size, xflip=ds.xflip)
    return ds, encoder, dataset


def _resolve_net_kwargs(config: TrainConfig, preset, ds, channels: int) -> dict:
    """Precond arguments: the preset's architecture, or that of `init` (fine-tuning)."""
    if config.init is not None:
        _, init_meta = load_network(config.init)
        if snapshot_config(init_meta) != preset.config:
            raise EDM2Error(f"init={config.init}: the network is config {snapshot_config(init_meta)} but "
                             f"config={preset.config}; pass config={snapshot_config(init_meta)} to fine-tune it")
        net_kwargs = {k: v for k, v in init_meta["net_kwargs"].items() if k not in ("use_fp16", "reduced_dtype")}
        for name, want in (("img_resolution", ds.resolution), ("img_channels", channels), ("label_dim", ds.label_dim)):
            if net_kwargs.get(name) != want:
                raise EDM2Error(f"init={config.init}: the network has {name}={net_kwargs.get(name)} but the "
                                 f"dataset needs {want}; pick a network trained on data like {config.data}")
        if config.channels is not None or config.dropout is not None:
            raise EDM2Error(f"init={config.init}: channels and dropout cannot change the architecture of the "
                             f"network it names; drop them")
    else:
        net_kwargs = preset.replace(model_channels=_pick(config.channels, preset.model_channels),
                                    dropout=_pick(config.dropout, preset.dropout)).net_kwargs(ds.label_dim)
        net_kwargs.update(img_resolution=ds.resolution, img_channels=channels)
        if preset.config in ("A", "B"):  # the ADM network: resolutions it has, heads that divide its widths
            net_kwargs = adm_net_kwargs(net_kwargs)
    net_kwargs["precision"] = config.precision
    with torch.device("meta"):
        build_network(preset.config, **net_kwargs)  # EDM2Error for an impossible architecture
    return net_kwargs


def _check_items(ds, limit: int = 2000) -> None:
    """Decode every item of a small dataset (or the first `limit`) now, so that an
    unreadable file is reported before anything is written."""
    for i in range(min(ds.raw_size, limit)):
        ds[i]


def _describe(plan: RunPlan, mode: str | None = None) -> str:
    """The resolved configuration and the network size, as text."""
    with torch.device("meta"):
        net = build_network(plan.config, **plan.net_kwargs)
    n_params = sum(p.numel() for p in net.parameters())
    recipe = RECIPES[plan.config]
    ema = (f"traditional EMA, half-life {plan.ema_halflife:.4g} images" if plan.ema == "traditional" else
           f"power-function EMA, sigma_rel {', '.join(map(str, plan.sigma_rel))}")
    lines = [json.dumps(plan.as_dict(), indent=2),
             f"config {plan.config} ({recipe.title}; docs/ablation.md): {type(net).__name__}, "
             f"{'EDM loss' if plan.loss == 'edm' else 'loss with learned uncertainty u(sigma)'}, "
             f"Adam betas (0.9, {plan.adam_beta2}), learning rate {plan.lr:g} "
             f"{'constant' if plan.decay <= 0 else f'decaying as 1/sqrt(t) after {plan.decay:g} batches'}, "
             f"loss scaling {plan.loss_scaling:g}, {ema}",
             f"network: {n_params:,} parameters ({n_params * 4 / 2 ** 20:.1f} MiB in fp32)",
             f"steps: {plan.duration // plan.batch:,} of {plan.batch} images"]
    if mode:
        lines.append(f"run folder: {mode}")
    return "\n".join(lines)


def dry_run(config: TrainConfig) -> str:
    """What `train(config)` would do, as text: the resolved plan, the network
    size and what happens to the run folder. Trains nothing, writes nothing."""
    device = resolve_device(config.device or None)
    parse_log_backends(config.log)
    plan, _ = plan_run(config, 1, str(device))
    return _describe(plan, check_run_folder(plan.identity(), Path(config.outdir), config.force_new))


# ---------------------------------------------------------------------------
# Deterministic randomness: functions of (seed, stream, position).
# ---------------------------------------------------------------------------

class Stream(enum.IntEnum):
    """The independent random streams of a run, and what `position` counts in each."""
    DATA_ORDER = 0   # position: epoch (one permutation of the dataset each)
    NOISE = 1        # position: image (its noise level and noise)
    DROPOUT = 2      # position: first image of a micro-batch
    INIT = 3         # position: 0 (the initial weights)


def sample_seed(seed: int, stream: Stream, position: int) -> int:
    """A 63-bit generator seed for (seed, stream, position), well mixed."""
    return int(np.random.SeedSequence([seed, int(stream), position]).generate_state(1, np.uint64)[0]) >> 1


def stream_indices(size: int, seed: int, positions, cache: dict | None = None) -> list[int]:
    """Dataset index of every training-stream position: epoch e = p // size is
    a seeded permutation of the dataset, position p takes its element p % size.
    `cache` (a dict) keeps the permutations between calls."""
    perms = {} if cache is None else cache
    out = []
    for p in positions:
        e = p // size
        if e not in perms:
            g = torch.Generator().manual_seed(sample_seed(seed, Stream.DATA_ORDER, e))
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
# Setup: everything the loop needs, in one `Run`.
# ---------------------------------------------------------------------------

@dataclass
class Run:
    """One invocation of a training run: what `setup` builds and the loop uses."""
    plan: RunPlan
    out: Path
    rank: int
    world: int
    device: torch.device
    data: ImageDataset
    net: Precond
    opt: torch.optim.Optimizer
    ema: PowerFunctionEMA | None          # rank 0 only
    loss_fn: EDM2Loss
    encoder: object                        # StandardRGBEncoder or StabilityVAEEncoder
    reporter: Reporter
    nimg: int                              # images trained so far
    start_nimg: int                        # ... when this invocation started
    stop_nimg: int                         # ... when it will stop
    result: TrainResult
    grid: int                              # images per sample grid (0 once grids turn out impossible)
    hooks: list = field(default_factory=list)   # called as hook(run) at every maintenance point
    model: torch.nn.Module | None = None   # what the loss calls: net, its DDP wrapper, compiled
    ddp: torch.nn.parallel.DistributedDataParallel | None = None
    batches: Iterator | None = None        # (images, labels) micro-batches of this process
    meter: StatusMeter | None = None
    bar: tqdm | None = None
    lock: RunLock | None = None            # the run folder's lock (rank 0)
    nonfinite_at: torch.Tensor | None = None   # on the device: first step (its image count) of the current
                                               # streak of steps with a non-finite loss (_FINITE: none)

    @property
    def per_rank(self) -> int:
        return self.plan.batch // self.world

    @property
    def rounds(self) -> int:
        """Micro-batches per step (gradient accumulation)."""
        return self.per_rank // self.plan.batch_gpu

    def close(self) -> None:
        """Close the progress bar and the reporter; release the run folder."""
        if self.bar is not None:
            self.bar.close()
        self.reporter.close()
        if self.lock is not None:
            self.lock.release()


Hook = Callable[[Run], None]   # called as hook(run) at every maintenance point


def setup(config: TrainConfig, rank: int = 0, world: int = 1, device: torch.device | None = None,
          hooks: tuple[Hook, ...] = ()) -> Run:
    """Check the configuration, lock and prepare the run folder, and build the
    network, optimizer and EMA, restored from the newest checkpoint when resuming.
    Nothing in the run folder changes when a check fails."""
    device = device or resolve_device(config.device or None)
    parse_log_backends(config.log)   # a backend that is not installed: refused before anything is written
    plan, ds = plan_run(config, world, str(device))
    out = Path(config.outdir)
    lock = _lock_run_folder(out, rank, world)
    run = None
    try:
        mode = check_run_folder(plan.identity(), out, config.force_new)
        state, path, notes = _find_resume_state(out, mode, device)
        if mode == "resume":
            _check_grids(plan, out, state)
        if world > 1:  # every process has read the folder before rank 0 starts writing into it
            dist.barrier()
        _configure_device(device, config.threads)
        _prepare_folder(plan, out, mode, rank, world)
        run = _build_run(plan, ds, out, rank, world, device, hooks, config.log)
        run.lock = lock
        for note in notes:
            run.reporter.log(note)
        if plan.ema == "traditional" and plan.ema_halflife != traditional_ema_halflife(plan.duration):
            run.reporter.log(f"config {plan.config}: the EMA half-life stays {plan.ema_halflife:.4g} images, as "
                             f"when the run started (duration={plan.duration} alone would give "
                             f"{traditional_ema_halflife(plan.duration):.4g})")
        if state is not None:
            _restore(run, state, path)
    except BaseException:
        if run is not None:
            run.reporter.close()   # the logging backends' files and W&B run
        if lock is not None:
            lock.release()
        raise
    run.stop_nimg = plan.duration if plan.slice is None else min(plan.duration, run.nimg + plan.slice)
    progress = sys.stderr.isatty() if config.progress is None else config.progress
    if rank == 0 and run.nimg < run.stop_nimg:
        run.bar = tqdm(total=run.stop_nimg - run.nimg, unit="img", disable=not progress, dynamic_ncols=True)
        run.reporter.bar = run.bar
    return run


def _lock_run_folder(out: Path, rank: int, world: int) -> RunLock | None:
    """Rank 0 takes the run folder's lock (another live invocation of the run is
    refused); under torchrun every process learns the outcome."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(out, "`outdir`").acquire()
        except (LockError, OSError) as e:
            error = e
    if world > 1:
        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0)
        if rank != 0 and message[0] is not None:
            raise LockError(message[0])
    if error is not None:
        raise error
    return lock


def _find_resume_state(out: Path, mode: str, device: torch.device):
    """(checkpoint state, its path, notes about unreadable newer checkpoints) to
    resume from; (None, None, []) for a new run. Refuses to start from image 0
    in a run folder whose files that would overwrite (see `check_restart`)."""
    if mode != "resume":
        return None, None, []
    notes = []
    state, path = load_latest_checkpoint(out, map_location=device, warn=notes.append)
    if state is None:
        check_restart(out)
    return state, path, notes


def _build_run(plan: RunPlan, ds, out: Path, rank: int, world: int, device: torch.device, hooks,
               log: str | None = None) -> Run:
    net = _network_for_plan(plan, device)
    # One W&B run per training run, continued on resume: the run's fingerprint, folder and the time its
    # config.json was written (a --force-new restart writes it again: a new W&B run).
    written = (out / "config.json").stat().st_mtime_ns if (out / "config.json").exists() else 0
    wandb_id = hashlib.sha256(f"{run_fingerprint(plan.identity())}:{out.resolve()}:{written}".encode()).hexdigest()[:16]
    reporter = Reporter(out, rank == 0, log=log, run_id=wandb_id, config=plan.identity())
    return Run(plan=plan, out=out, rank=rank, world=world, device=device, data=ds, net=net,
               opt=_optimizer_for_plan(plan, net), ema=_ema_for_plan(plan, net) if rank == 0 else None,
               loss_fn=_loss_for_plan(plan, net),
               encoder=encoder_from_meta(plan.encoder), reporter=reporter, nimg=0, start_nimg=0,
               stop_nimg=0, result=TrainResult(outdir=out, nimg=0, finished=False), grid=plan.grid,
               hooks=list(hooks))


def _configure_device(device: torch.device, threads: int | None) -> None:
    """CUDA: no TF32, cuDNN autotuning. CPU threads: `threads` when given, else as they are
    (`edm2 train` sets them with `edm2.utils.distributed.configure_threads`)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False   # no TF32 (docs/design.md#optimisation)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    if threads is not None:
        configure_threads(threads)


def _prepare_folder(plan: RunPlan, out: Path, mode: str, rank: int, world: int) -> None:
    """Rank 0 prepares the run folder (archive, temp files, config.json); the others wait."""
    if rank == 0:
        if mode == "archive":
            archive_run(out)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)
        if mode != "resume":
            atomic_write_bytes(out / "config.json", json.dumps(plan.identity(), indent=2).encode())
    if world > 1:
        dist.barrier()


def _network_for_plan(plan: RunPlan, device: torch.device) -> Precond:
    """The network to train: seeded initial weights, or those of `plan.init`."""
    torch.manual_seed(sample_seed(plan.seed, Stream.INIT, 0))
    net = build_network(plan.config, **plan.net_kwargs).to(device).train().requires_grad_(True)
    if plan.init is not None:
        net.load_state_dict(load_network(plan.init)[0].state_dict())
    return net


def _optimizer_for_plan(plan: RunPlan, net: Precond) -> torch.optim.Optimizer:
    """Adam with the config's betas (0.9, 0.99; config A: 0.9, 0.999; App. B.2); the
    learning rate is set every step."""
    return torch.optim.Adam(net.parameters(), lr=0.0, betas=(0.9, plan.adam_beta2), eps=1e-8)


def _loss_for_plan(plan: RunPlan, net: Precond):
    """The config's loss: learned uncertainty (Eq. 21, configs B-G) or EDM's (Eq. 14, config A)."""
    kind = EDMLoss if plan.loss == "edm" else EDM2Loss
    return kind(P_mean=plan.P_mean, P_std=plan.P_std, sigma_data=net.sigma_data)


def _ema_for_plan(plan: RunPlan, net: Precond):
    """The config's EMA: power-function profiles for post-hoc EMA (Sec. 3, configs B-G),
    or a traditional EMA with a half-life (config A)."""
    if plan.ema == "traditional":
        return TraditionalEMA(net, plan.ema_halflife, plan.ema_rampup_ratio)
    return PowerFunctionEMA(net, plan.sigma_rel)


# ---------------------------------------------------------------------------
# What a checkpoint holds (edm2.train.checkpoint writes and reads the file):
# one declaration, used both to save and to restore.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Part:
    """One entry of a checkpoint: how to get it from a Run, and how to put it back."""
    get: Callable[[Run], object]
    restore: Callable[[Run, object, Path], None]


def _restore_ema(run: Run, value, path: Path) -> None:
    if run.ema is not None:           # rank 0 only
        run.ema.load_state_dict(value, run.nimg)


def _check_seed(run: Run, value, path: Path) -> None:
    if int(value) != run.plan.seed:
        raise EDM2Error(f"{path}: a checkpoint of seed {int(value)}, but the run has seed={run.plan.seed}; "
                        f"move the checkpoint away or use force_new=True to start over")


def _restore_nimg(run: Run, value, path: Path) -> None:
    run.nimg = run.start_nimg = run.result.nimg = int(value)


# Restored in this order (the EMA's restore needs the image count). The image count is also the position in
# the data order and in every random stream (`Stream`), so nothing else is needed to continue bit for bit.
# Checkpoints of earlier versions also hold `data_position` (always equal to `nimg`); it is not read.
_CHECKPOINT_PARTS = {
    "nimg": _Part(lambda run: run.nimg, _restore_nimg),
    "seed": _Part(lambda run: run.plan.seed, _check_seed),
    "net": _Part(lambda run: run.net.state_dict(), lambda run, value, path: run.net.load_state_dict(value)),
    "optimizer": _Part(lambda run: run.opt.state_dict(), lambda run, value, path: run.opt.load_state_dict(value)),
    # The tracker's own run id is left out: the trainer's snapshots carry the run's fingerprint (save_snapshots).
    "ema": _Part(lambda run: {k: v for k, v in run.ema.state_dict().items() if k != "run_id"}, _restore_ema),
}


def _restore(run: Run, state: dict, path: Path) -> None:
    """Network, optimizer, EMA and image count from a checkpoint's state; the seed is checked."""
    missing = [name for name in _CHECKPOINT_PARTS if name not in state]
    if missing:
        raise EDM2Error(f"{path}: not a complete training checkpoint (no {', '.join(missing)})")
    for name, part in _CHECKPOINT_PARTS.items():
        part.restore(run, state[name], path)
    run.reporter.log(f"resuming from {path.name} at {run.nimg} images")


def save_run_checkpoint(run: Run) -> None:
    """Write the checkpoint of the run at run.nimg (rank 0)."""
    path = run.out / checkpoint_name(run.nimg)
    save_checkpoint(path, {name: part.get(run) for name, part in _CHECKPOINT_PARTS.items()})
    run.result.checkpoint = path


def start_session(run: Run) -> None:
    """The parts only a run with work to do needs: DDP, compilation, the data
    loader from the current image on, the status meter; and the opening line."""
    plan, ds = run.plan, run.data
    if plan.channels_last:  # values and parameter identities unchanged: the optimizer and EMA keep working
        to_channels_last(run.net)
    run.model = run.net
    if run.world > 1:
        run.model = run.ddp = torch.nn.parallel.DistributedDataParallel(
            run.net, device_ids=[run.device] if run.device.type == "cuda" else None, broadcast_buffers=False)
    if plan.compile:
        run.model = torch.compile(run.model)
    sampler = _StreamSampler(len(ds), plan.seed, run.nimg, plan.batch, plan.batch_gpu, run.rank, run.world)
    run.batches = iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=plan.workers,
                                                   pin_memory=run.device.type == "cuda",
                                                   prefetch_factor=2 if plan.workers else None))
    run.meter = StatusMeter(run.device, run.world, run.nimg)
    run.nonfinite_at = torch.full([], _FINITE, dtype=torch.int64, device=run.device)
    n_params = sum(p.numel() for p in run.net.parameters())
    run.reporter.log(
        f"run {run.out}: {plan.preset}, {n_params:,} parameters, data {plan.data} ({len(ds)} items, "
        f"{plan.dataset['channels']}x{ds.resolution}x{ds.resolution}, label_dim {ds.label_dim}), "
        f"batch {plan.batch} ({run.world} process(es) x {plan.batch_gpu} x {run.rounds} round(s)), "
        f"device {run.device}, images {run.start_nimg} -> {run.stop_nimg} of {plan.duration}")


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------

def train(config: TrainConfig, hooks: tuple[Hook, ...] = ()) -> TrainResult:
    """Train (or resume) the run in config.outdir; see the module docstring.

    Under torchrun every process calls this; rank 0 writes the files. `hooks`:
    callables hook(run) called at every maintenance point (before each step
    and at the end), e.g. to measure something every N images.
    """
    with _process_group() as (rank, world):
        run = setup(config, rank, world, hooks=hooks)
        try:
            if config.dynamics:   # magnitudes per U-Net level every N images (docs/dynamics.md)
                run.hooks.append(DynamicsHook(config.dynamics, config.dynamics_probe,
                                              writer=run.reporter.tensorboard))
            if run.nimg >= run.stop_nimg:
                run.reporter.log(f"nothing to do: the run in {run.out} is at {run.nimg} images "
                                 f"of duration {run.plan.duration}")
                run.result.finished = True
                return run.result
            start_session(run)
            return train_loop(run)
        finally:
            run.close()


@contextlib.contextmanager
def _process_group():
    """(rank, world) of this process; joins (and afterwards leaves) the torchrun group."""
    created = not (dist.is_available() and dist.is_initialized())
    rank, world = init_distributed()
    try:
        yield rank, world
    finally:
        if created and world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train_loop(run: Run) -> TrainResult:
    """Steps from run.nimg to run.stop_nimg; maintenance before each step and at the end."""
    while True:
        lr = set_learning_rate(run)
        with run.meter.maintenance():
            maintenance(run, lr)
        if run.nimg >= run.stop_nimg:
            break
        train_step(run)
        if run.ema is not None:
            run.ema.update(run.net, run.nimg + run.plan.batch, run.plan.batch)
        run.nimg += run.plan.batch
        if run.bar is not None:
            run.bar.update(run.plan.batch)
    run.result.nimg = run.nimg
    run.result.finished = run.nimg >= run.plan.duration
    return run.result


def set_learning_rate(run: Run) -> float:
    """The learning rate of the coming step (paper Eq. 67: inverse square-root decay)."""
    plan = run.plan
    lr = learning_rate_schedule(run.nimg, plan.batch, plan.lr, plan.decay, plan.rampup_Mimg)
    for g in run.opt.param_groups:
        g["lr"] = lr
    return lr


def maintenance(run: Run, lr: float) -> None:
    """Status line, snapshots and grid, checkpoint, hooks: whichever is due at run.nimg.
    Nothing is saved once the training has diverged (`check_finite`)."""
    plan, nimg, done = run.plan, run.nimg, run.nimg >= run.stop_nimg
    status = nimg % plan.status == 0 or done
    snapshot = (nimg % plan.snapshot == 0 or nimg == plan.duration) and (nimg != run.start_nimg or nimg == 0)
    checkpoint = nimg != run.start_nimg and (nimg % plan.checkpoint == 0 or done)   # (snapshot: also at image 0)
    if status:
        run.meter.report(run.reporter, nimg, lr)
    if status or snapshot or checkpoint:
        check_finite(run, snapshot)
    if run.rank == 0 and snapshot:
        save_snapshots(run)
    if run.rank == 0 and checkpoint:
        save_run_checkpoint(run)
    for hook in run.hooks:
        hook(run)


_FINITE = 2 ** 62   # `Run.nonfinite_at` while the last step's loss was finite
_DIVERGED_STEPS = 2  # steps in a row with a non-finite loss that make a diverged run


def check_finite(run: Run, snapshot: bool) -> None:
    """Stop (`EDM2Error`, on every process) when the loss has been non-finite in
    the last `_DIVERGED_STEPS` steps or more, or the network (or, when a snapshot
    is due, an EMA network) holds a non-finite value: a diverged run (e.g. a far
    too large `lr`) would otherwise train on NaN and save NaN snapshots and
    checkpoints. A lone non-finite loss (an fp16 overflow, say) whose gradient
    elements are zeroed before the step (`train_step`) leaves the weights finite,
    and training goes on. The streak is tracked on the device in `train_step`,
    so this is the only synchronisation, at status, snapshot and checkpoint points."""
    start = run.nonfinite_at if run.nonfinite_at is not None else torch.full([], _FINITE, device=run.device)
    at = torch.where(run.nimg - start >= _DIVERGED_STEPS * run.plan.batch, start, torch.full_like(start, _FINITE))
    nets = [run.net] + (list(run.ema.nets.values()) if snapshot and run.ema is not None else [])
    finite = torch.stack([torch.isfinite(p).all() for net in nets for p in net.parameters()]).all()
    # Non-finite weights: diverged from the streak's first step, or else from now.
    at = torch.where(finite, at, start.clamp(max=run.nimg))
    if run.world > 1:
        at = at.clone()
        dist.all_reduce(at, op=dist.ReduceOp.MIN)
    if int(at) != _FINITE:
        message = _diverged_message(run, int(at))
        run.reporter.log(f"stopped: {message}")
        raise EDM2Error(message)


def _diverged_message(run: Run, at: int) -> str:
    """What went wrong (from which image), the last good checkpoint and snapshot, and what to do."""
    checkpoints = [p for n, p in list_checkpoints(run.out) if n <= at]
    snapshots = [p for n, _, p in list_snapshots(run.out) if n <= at]
    checkpoint = checkpoints[-1] if checkpoints else "none"
    snapshot = snapshots[-1] if snapshots else None
    return (f"lr={run.plan.lr:g}: the training diverged: the loss of the step from image {at} is not finite; "
            f"nothing after image {at} was saved; last good checkpoint: {checkpoint}; last good snapshot: "
            f"{snapshot or 'none'}; lr may not change on resume, so start again with a lower lr in another outdir "
            f"or with force_new=True, or fine-tune with init={snapshot or 'SNAPSHOT'} and a lower lr in another "
            f"outdir")


def _grid_path(out: Path, nimg: int) -> Path:
    return out / f"grid-{nimg:012d}.png"


def _check_grids(plan: RunPlan, out: Path, state: dict | None) -> None:
    """Refuse (before anything is written) to resume a run whose folder holds, where
    this invocation would write a sample grid, a file that is not a grid of this run."""
    if not plan.grid or not out.is_dir():
        return
    start = int(state["nimg"]) if state is not None and "nimg" in state else 0
    stop = plan.duration if plan.slice is None else min(plan.duration, start + plan.slice)
    owner = run_fingerprint(plan.identity())
    for path in sorted(out.glob("grid-*.png")):
        nimg = path.name[len("grid-"):-len(".png")]
        if nimg.isdigit() and start < int(nimg) <= stop and (int(nimg) % plan.snapshot == 0 or
                                                              int(nimg) == plan.duration):
            check_grid_owner(path, owner)


def save_snapshots(run: Run) -> None:
    """One snapshot per EMA profile, and a sample grid of the longest one."""
    plan, nimg = run.plan, run.nimg
    dataset = {k: plan.dataset[k] for k in ("resolution", "channels", "label_dim", "class_names", "path")}
    origin = {"preset": plan.preset, "run": str(run.out.resolve()), "seed": plan.seed, "tool": "edm2 train",
              "run_id": run_fingerprint(plan.identity())}  # post-hoc EMA refuses to mix runs; grids carry it too
    traditional = plan.ema == "traditional"
    for key, ema_net in run.ema.nets.items():
        sigma_rel = None if traditional else key
        path = run.out / snapshot_name(nimg, sigma_rel, traditional=traditional)
        save_snapshot(path, ema_net, make_meta(plan.net_kwargs, nimg, sigma_rel, plan.encoder, dataset, origin,
                                               config=plan.config,
                                               ema_halflife=plan.ema_halflife if traditional else None))
        run.result.snapshots.append(path)
    if run.grid and nimg > 0:  # (a grid of the untrained network would be noise)
        try:
            save_grid(_grid_path(run.out, nimg), run.ema.nets[max(run.ema.nets)], run.encoder, run.grid,
                      run.device, owner=origin["run_id"])
        except VAEUnavailable as e:
            run.reporter.log(f"no sample grids: {e}")
            run.grid = 0
        for m in run.ema.nets.values():
            m.eval()  # drops the MPConv weight caches


def train_step(run: Run) -> None:
    """One optimizer step over plan.batch images, in run.rounds micro-batches per process."""
    plan = run.plan
    run.opt.zero_grad(set_to_none=True)
    finite = torch.ones([], dtype=torch.bool, device=run.device)
    for r in range(run.rounds):
        first = run.nimg + run.rank * run.per_rank + r * plan.batch_gpu
        x, labels, gens = _micro_batch(run, first)
        sync = run.ddp.no_sync() if run.ddp is not None and r < run.rounds - 1 else contextlib.nullcontext()
        with sync:
            if plan.compile:  # a compiled graph leaves MPConv's in-place forced normalisation out
                force_normalize_(run.net)
            loss = run.loss_fn(run.model, x, labels, generator=gens)   # per-pixel loss, paper Eq. 21
            loss.sum().mul(plan.loss_scaling / run.per_rank).backward()
        run.meter.add_loss(loss)
        finite &= torch.isfinite(loss.detach()).all()
    if run.nonfinite_at is not None:  # the streak's first image count, without waiting for the device
        at = run.nonfinite_at
        run.nonfinite_at = torch.where(finite, torch.full_like(at, _FINITE), at.clamp(max=run.nimg))
    for p in run.net.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
    run.opt.step()


def _micro_batch(run: Run, first: int):
    """The next micro-batch, whose first image is at stream position `first`:
    (encoded images, labels or None, one noise generator per image). Seeds the
    dropout masks of this micro-batch."""
    images, labels = _next_batch(run.batches)
    gens = [torch.Generator(run.device).manual_seed(sample_seed(run.plan.seed, Stream.NOISE, first + i))
            for i in range(len(images))]
    torch.manual_seed(sample_seed(run.plan.seed, Stream.DROPOUT, first))
    images = images.to(run.device, non_blocking=True)
    if run.data.is_latent:  # one posterior sample per item, from the item's own generator (App. B.1)
        x = torch.cat([run.encoder.encode_latents(images[i:i + 1], g) for i, g in enumerate(gens)])
    else:
        x = run.encoder.encode_latents(images)
    labels = labels.to(run.device) if run.data.label_dim else None
    return x, labels, gens


def _next_batch(batches: Iterator):
    """The next micro-batch; a data error of edm2's (possibly re-raised from a loader
    worker, whose message then holds the worker's traceback) becomes its last line.
    Any other exception is a bug and keeps its traceback."""
    try:
        return next(batches)
    except EDM2Error as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise EDM2Error(lines[-1] if lines else str(e)) from None

