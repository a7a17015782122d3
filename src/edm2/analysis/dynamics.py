"""Training dynamics: the measurements behind the paper's Fig. 3 and Fig. 15.

The paper (Sec. 2 and App. A.6) follows how the magnitudes of activations and
weights evolve over training, per depth of the U-Net. This module measures
the same numbers on any network whose encoder and decoder modules are named
like ours and the EDM/ADM ones (`enc['16x16_block0']`, `dec['8x8_in0']`,
...), without knowing its class:

- **Layers** (`find_layers`): every trainable weight tensor with two or more
  dimensions (convolutions, fully connected layers, attention qkv/proj, the
  per-block embedding projection) inside a module whose name holds
  `enc.<R>x<R>_...` or `dec.<R>x<R>_...`. One-dimensional and scalar
  parameters (biases, normalisation scales, learned gains) are left out, as
  in App. A.6. Each weight falls into one of the buckets
  {enc, dec} x resolution, named e.g. `enc-32x32`.
- **Activation magnitude**: the immediate output of the module that owns the
  weight (a forward hook, so after its bias and after its gain; for a
  magnitude-preserving convolution called with a learned gain, after that
  gain), reduced per feature to M[h_i] = sqrt(mean_j h_ij^2) over the spatial
  positions j (App. A.6, Eq. 3: unit-normal activations give 1), averaged
  over the samples of a fixed measurement batch (`MeasurementBatch`).
- **Weight magnitude**: the same M per output row of the stored weight,
  reshaped to out x rest.
- Both are aggregated per bucket by max (Fig. 3) and by mean (Fig. 15).
- **Relative update** ||w_now - w_before|| / ||w_before|| per bucket between two
  measurements (the effective learning rate of Sec. 2.3), **gradient
  norm** (total and per bucket), **loss per noise level** lambda(sigma)·||D - y||^2
  (Eq. 13-15, in equal-probability bins of the training distribution of
  sigma) and the **learned uncertainty** u(sigma) of the loss (Eq. 21), for
  networks that return it (`net(x, sigma, labels, return_logvar=True)`).

`measure(net, batch)` returns plain dicts; `DynamicsTracker` appends one JSON
record per network and measurement to `dynamics.jsonl` in a run folder (and
TensorBoard with `--log tensorboard`); `load_dynamics(run)` reads them back;
`plot_dynamics` and `plot_loss_profile` draw the figures (see docs/dynamics.md).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data import ImageDataset
from ..encoders import encoder_from_meta
from ..io.snapshot import list_snapshots, load_snapshot, read_snapshot_meta
from ..utils.errors import EDM2Error, ExistingFileError, MissingFileError
from ..utils.fileio import atomic_write_bytes, move_into_place, pyplot, save_figure

__all__ = ["DynamicsHook", "measure", "make_measurement_batch", "measure_snapshots", "load_dynamics",
           "growth_factors", "plot_dynamics", "plot_loss_profile", "find_blocks"]

DYNAMICS_FILE = "dynamics.jsonl"
SNAPSHOTS_FILE = "dynamics-snapshots.jsonl"     # measure_snapshots: records of the stored snapshots
# A block of the U-Net: a module held directly by its `enc` or `dec` dict, named '<R>x<R>_...'
# (ours, the authors' EDM2 and ADM networks alike).
_BLOCK_RE = re.compile(r"(?:^|\.)((enc|dec)\.(\d+)x(\d+)_\w+)(?=\.|$)")


# ---------------------------------------------------------------------------
# Layers and buckets.
# ---------------------------------------------------------------------------

def find_blocks(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{'enc.16x16_block0': module, ..., 'dec.8x8_in0': module, ...}: the
    U-Net's encoder and decoder blocks (the modules held directly by its `enc`
    and `dec` dicts), encoder first, each in forward order. The one place that
    finds the blocks: `bucket_of` (and so `find_layers`) and the linear probe
    (`edm2.analysis.probe.list_layers`) use it."""
    enc, dec = {}, {}
    for name, module in net.named_modules():
        m = _BLOCK_RE.search(name)
        if m is not None and m.end() == len(name):
            (enc if m.group(2) == "enc" else dec)[m.group(1)] = module
    return {**enc, **dec}


def bucket_of(module_name: str) -> str | None:
    """'unet.enc.32x32_block1.conv_res0' -> 'enc-32x32' (the block's side and
    resolution); None outside the encoder/decoder."""
    m = _BLOCK_RE.search(module_name)
    return None if m is None else f"{m.group(2)}-{m.group(3)}x{m.group(4)}"


def bucket_sort_key(bucket: str):
    """Encoder before decoder, each from the highest resolution down."""
    side, res = bucket.split("-")
    return (0 if side == "enc" else 1, -int(res.split("x")[0]))


@dataclass
class Layer:
    """One analysed weight tensor."""
    name: str                    # parameter name, e.g. 'unet.enc.16x16_block0.conv_res0.weight'
    module_name: str             # the module that owns it
    bucket: str                  # 'enc-16x16'
    module: torch.nn.Module
    weight: torch.nn.Parameter
    hooked: bool                 # its module's output is its activation (the module owns no other weight)


def find_layers(net: torch.nn.Module) -> list[Layer]:
    """Every weight tensor (>= 2 dims) of the encoder/decoder blocks, in module order."""
    layers, seen = [], set()
    for module_name, module in net.named_modules():
        bucket = bucket_of(module_name)
        if bucket is None:
            continue
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.ndim >= 2 and id(p) not in seen]
        for n, p in own:
            seen.add(id(p))
            layers.append(Layer(f"{module_name}.{n}", module_name, bucket, module, p, hooked=len(own) == 1))
    return layers


def _require_layers(net) -> list[Layer]:
    layers = find_layers(net)
    if not layers:
        raise EDM2Error(f"{type(net).__name__}: no encoder/decoder weights found; the dynamics tracker looks for "
                         f"modules named like enc['32x32_block0'] / dec['8x8_in0'] (module paths containing "
                         f"'enc.<R>x<R>_' or 'dec.<R>x<R>_')")
    return layers


def _rms_rows(w: torch.Tensor) -> torch.Tensor:
    """Per-output-row magnitude sqrt(mean w^2) of w reshaped to out x rest (App. A.6)."""
    w = w.detach().to(torch.float32)
    return w.reshape(w.shape[0], -1).square().mean(1).sqrt()


def _aggregate(values: dict[str, list[torch.Tensor]]) -> tuple[dict, dict]:
    mx, mean = {}, {}
    for bucket in sorted(values, key=bucket_sort_key):
        v = torch.cat([t.reshape(-1) for t in values[bucket]])
        mx[bucket], mean[bucket] = float(v.max()), float(v.mean())
    return mx, mean


def weight_magnitudes(net: torch.nn.Module) -> dict:
    """{'weight_max': {bucket: x}, 'weight_mean': {bucket: x}, 'layers': {name: {'weight_max', 'weight_mean'}}}."""
    per_bucket, layers = {}, {}
    for layer in _require_layers(net):
        m = _rms_rows(layer.weight)
        per_bucket.setdefault(layer.bucket, []).append(m)
        layers[layer.name] = {"weight_max": float(m.max()), "weight_mean": float(m.mean())}
    mx, mean = _aggregate(per_bucket)
    return {"weight_max": mx, "weight_mean": mean, "layers": layers}


def relative_updates(net: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per bucket ||w - w_before|| / ||w_before|| over all its tensors (tensors missing from `before` are skipped)."""
    num, den = {}, {}
    for layer in find_layers(net):
        old = before.get(layer.name)
        if old is None or old.shape != layer.weight.shape:
            continue
        w = layer.weight.detach().to(torch.float32)
        num[layer.bucket] = num.get(layer.bucket, 0.0) + float((w - old.to(w.device)).square().sum())
        den[layer.bucket] = den.get(layer.bucket, 0.0) + float(old.square().sum())
    return {b: math.sqrt(num[b]) / math.sqrt(den[b]) if den[b] > 0 else float("nan")
            for b in sorted(num, key=bucket_sort_key)}


def gradient_norms(net: torch.nn.Module, scale: float = 1.0) -> dict | None:
    """{'grad_norm': total L2 norm of the parameters' .grad / scale, 'grad_norm_bucket': {bucket: norm}};
    None when the network holds no gradients."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if not grads:
        return None
    total = math.sqrt(sum(float(g.detach().to(torch.float32).square().sum()) for g in grads)) / scale
    per = {}
    for layer in find_layers(net):
        if layer.weight.grad is not None:
            per[layer.bucket] = per.get(layer.bucket, 0.0) + float(layer.weight.grad.to(torch.float32).square().sum())
    order = sorted(per, key=bucket_sort_key)
    return {"grad_norm": total, "grad_norm_bucket": {b: math.sqrt(per[b]) / scale for b in order}}


# ---------------------------------------------------------------------------
# The measurement batch.
# ---------------------------------------------------------------------------

@dataclass
class MeasurementBatch:
    """A fixed batch to measure on: clean images y (in the network's space:
    pixels in [-1, 1] or standardised latents), their labels, unit-normal
    noise and one noise level per sample; `bin` groups the samples into
    noise-level bins for the loss profile."""
    images: torch.Tensor             # [N, C, H, W] float32
    labels: torch.Tensor | None      # [N, label_dim] or None
    noise: torch.Tensor              # [N, C, H, W], unit normal
    sigma: torch.Tensor              # [N]
    bin: torch.Tensor                # [N] int64 in [0, bins)
    bins: int

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device) -> MeasurementBatch:
        labels = None if self.labels is None else self.labels.to(device)
        return MeasurementBatch(self.images.to(device), labels, self.noise.to(device), self.sigma.to(device),
                                self.bin.to(device), self.bins)


def make_measurement_batch(images: torch.Tensor, labels: torch.Tensor | None = None, *, seed: int = 0,
                           P_mean: float = -0.4, P_std: float = 1.0, sigma: torch.Tensor | None = None,
                           bins: int = 8) -> MeasurementBatch:
    """A measurement batch of these images. The noise levels (unless given) are the N
    quantiles (i + 1/2) / N of the training distribution ln(sigma) ~
    N(P_mean, P_std^2) (paper Eq. 16), assigned to the samples in a seeded
    random order; bin b holds the samples of the b-th equal-probability band.
    The noise comes from `seed`: measuring the same network twice gives
    the same numbers."""
    images = images.to(torch.float32)
    n = len(images)
    if n < 1:
        raise EDM2Error("make_measurement_batch: no images")
    g = torch.Generator().manual_seed(int(seed))
    if sigma is None:
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        z = math.sqrt(2) * torch.special.erfinv(2 * q - 1)
        ranks = torch.randperm(n, generator=g)
        sigma = (P_mean + P_std * z[ranks]).exp().to(torch.float32)
    else:
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(n).clone()
        ranks = torch.argsort(torch.argsort(sigma, stable=True), stable=True)
    bins = max(1, min(int(bins), n))
    noise = torch.randn(images.shape, generator=g)
    return MeasurementBatch(images.cpu(), None if labels is None else labels.to(torch.float32).cpu(), noise, sigma,
                 (ranks * bins // n).to(torch.int64), bins)


def measurement_batch_from_dataset(dataset, encoder, count: int = 256, seed: int = 0, P_mean: float = -0.4,
                                   P_std: float = 1.0, bins: int = 8, use_labels: bool = True) -> MeasurementBatch:
    """A measurement batch of `count` training items chosen by a seeded permutation of
    `dataset` (an edm2.data.ImageDataset), encoded by `encoder` as in
    training (latent datasets: one fixed posterior sample per item)."""
    n = min(int(count), len(dataset))
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    items = [dataset[i] for i in idx]
    raw = torch.as_tensor(np.stack([it[0] for it in items]))
    if getattr(dataset, "is_latent", False):
        x = torch.cat([encoder.encode_latents(raw[i:i + 1], torch.Generator().manual_seed(int(seed) * 1_000_003 + i))
                       for i in range(n)])
    else:
        x = encoder.encode_latents(raw)
    labels = None
    if use_labels and getattr(dataset, "label_dim", 0):
        labels = torch.as_tensor(np.stack([it[1] for it in items]), dtype=torch.float32)
    return make_measurement_batch(x, labels, seed=seed + 1, P_mean=P_mean, P_std=P_std, bins=bins)


# ---------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------

# Measurement-batch items per network call while measuring. The numbers do not depend on it (per-item
# quantities, sums in float64); on a CPU, calls of 64 items run about 20% faster per item than
# one call of 256, whose activations no longer fit the caches (BENCHMARKS.md, "Training dynamics cost").
MEASURE_BATCH = 64


def _accepts_logvar(net) -> bool:
    try:
        return "return_logvar" in inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def measure(net: torch.nn.Module, batch: MeasurementBatch, batch_size: int = MEASURE_BATCH,
            sigma_data: float | None = None, u_points: int = 32) -> dict:
    """Measure `net` (called as net(x, sigma, labels[, return_logvar=True])) on
    the measurement `batch`, in eval mode (no dropout, weights untouched); the network's mode
    is restored afterwards. Returns

        act_max, act_mean, weight_max, weight_mean: {bucket: float}
        layers: {weight name: {act_max, act_mean, weight_max, weight_mean}}
        loss_sigma, loss: per noise-level bin, geometric-mean sigma and mean lambda(sigma)·||D-y||^2 / elements
        loss_mean: the mean of that over the batch
        u_sigma, u: the learned u(sigma) at up to `u_points` of the batch's noise levels (absent without it)
    """
    layers = _require_layers(net)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    sd = float(sigma_data if sigma_data is not None else getattr(net, "sigma_data", 0.5))
    acc: dict[int, list] = {}

    def hook(module, inputs, output):
        h = output[0] if isinstance(output, (tuple, list)) else output
        if not torch.is_tensor(h):
            return
        h = h.detach().to(torch.float32)
        if h.ndim >= 3:
            m = h.flatten(2).square().mean(2).sqrt()      # [N, C]: per feature over the positions
        elif h.ndim == 2:
            m = h.abs()                                   # a vector per sample (e.g. the embedding projection)
        else:
            m = h.abs().reshape(1, -1)
        slot = acc.setdefault(id(module), [torch.zeros(m.shape[1], dtype=torch.float64, device=m.device), 0])
        if slot[0].shape[0] != m.shape[1]:
            return
        slot[0] += m.sum(0, dtype=torch.float64)
        slot[1] += m.shape[0]

    modules = {id(layer.module): layer.module for layer in layers if layer.hooked}
    handles = [m.register_forward_hook(hook) for m in modules.values()]
    was_training = net.training
    with_logvar = _accepts_logvar(net) and getattr(net, "uncertainty", True) is not False
    losses, logvars = [], []
    try:
        net.eval()
        p = batch.to(device)
        for start in range(0, len(p), batch_size):
            sl = slice(start, start + batch_size)
            y, sigma = p.images[sl], p.sigma[sl]
            x = y + p.noise[sl] * sigma.reshape(-1, 1, 1, 1)
            labels = None if p.labels is None else p.labels[sl]
            if with_logvar:
                try:
                    out = net(x, sigma, labels, return_logvar=True)
                except (TypeError, ValueError):   # the call exists, but this network has no u(sigma)
                    if start:
                        raise
                    with_logvar = False
                    acc.clear()
            if with_logvar:
                denoised, logvar = out if isinstance(out, tuple) else (out, None)
            else:
                denoised, logvar = net(x, sigma, labels), None
            weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2                     # lambda(sigma), Eq. 15
            losses.append(weight * (denoised.to(torch.float32) - y).square().flatten(1).mean(1))
            if logvar is not None:
                logvars.append(logvar.to(torch.float32).reshape(-1))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)

    act_bucket, weight_bucket, per_layer = {}, {}, {}
    for layer in layers:
        w = _rms_rows(layer.weight)
        weight_bucket.setdefault(layer.bucket, []).append(w)
        entry = {"weight_max": float(w.max()), "weight_mean": float(w.mean())}
        slot = acc.get(id(layer.module)) if layer.hooked else None
        if slot is not None and slot[1] > 0:
            a = (slot[0] / slot[1]).to(torch.float32).cpu()
            act_bucket.setdefault(layer.bucket, []).append(a)
            entry.update(act_max=float(a.max()), act_mean=float(a.mean()))
        per_layer[layer.name] = entry
    act_max, act_mean = _aggregate(act_bucket)
    weight_max, weight_mean = _aggregate(weight_bucket)

    loss = torch.cat(losses).cpu().to(torch.float64)
    sig = batch.sigma.to(torch.float64)
    loss_sigma, loss_bins = [], []
    for b in range(batch.bins):
        sel = batch.bin == b
        if sel.any():
            loss_sigma.append(float(sig[sel].log().mean().exp()))
            loss_bins.append(float(loss[sel].mean()))
    result = {"act_max": act_max, "act_mean": act_mean, "weight_max": weight_max, "weight_mean": weight_mean,
              "loss_sigma": loss_sigma, "loss": loss_bins, "loss_mean": float(loss.mean()), "layers": per_layer}
    if logvars:
        u = torch.cat(logvars).cpu()
        order = torch.argsort(batch.sigma)
        pick = order[torch.linspace(0, len(order) - 1, min(u_points, len(order))).round().long()]
        result["u_sigma"] = [float(batch.sigma[i]) for i in pick]
        result["u"] = [float(u[i]) for i in pick]
    return result


# ---------------------------------------------------------------------------
# Recording during training.
# ---------------------------------------------------------------------------

def _clean(value):
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class DynamicsTracker:
    """Measures networks every so often and appends the records to
    `<outdir>/dynamics.jsonl`, one JSON object per line and network:

        {"nimg": ..., "net": "ema" | "raw", "ema_std": ..., "time": ..., "seconds": ...,
         "act_max": {bucket: x}, ..., "update": {bucket: x} | null,
         "grad_norm": x, "grad_norm_bucket": {...}, "loss_sigma": [...], "loss": [...], "u_sigma": [...], "u": [...],
         "layers": {...}}

    `start_nimg`: a resumed run drops the records after the checkpoint it
    resumes from (they are measured again), so the file matches the training
    that the run folder holds. `update` compares with the previous measurement
    of the same network in this invocation (null for the first one)."""

    def __init__(self, outdir, batch: MeasurementBatch, start_nimg: int = 0, writer=None,
                 batch_size: int = MEASURE_BATCH,
                 filename: str = DYNAMICS_FILE):
        self.path = Path(outdir) / filename
        self.batch = batch
        self.batch_size = batch_size
        self.before: dict[str, dict[str, torch.Tensor]] = {}
        self.seconds = 0.0
        self.last_nimg = None            # nimg of the last record in the file
        if self.path.exists():
            keep = [r for r in _read_records(self.path) if r.get("nimg", 0) <= start_nimg]
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
            self.last_nimg = keep[-1]["nimg"] if keep else None
        self.writer = writer  # a TensorBoard SummaryWriter owned by the caller (the trainer's Reporter), or None

    def remember(self, nets: dict) -> None:
        """Take these weights as the previous measurement's (a resumed run whose
        last record is at the checkpoint it resumes from)."""
        for tag, net in nets.items():
            # Kept in host memory: one float32 copy of the analysed weights per network.
            self.before[tag] = {layer.name: layer.weight.detach().to("cpu", torch.float32, copy=True)
                                for layer in find_layers(net)}

    def measure(self, nimg: int, nets: dict, grad_net: torch.nn.Module | None = None, grad_scale: float = 1.0,
                extra: dict | None = None) -> list[dict]:
        """Measure every network of `nets` ({'ema': module, 'raw': module}); the
        gradient norm is read from `grad_net`'s .grad (its last backward pass,
        divided by `grad_scale`, e.g. the loss scaling) into the 'raw' record."""
        t0 = time.perf_counter()
        records = []
        for tag, net in nets.items():
            rec = {"nimg": int(nimg), "net": tag, **(extra or {}).get(tag, {})}
            rec.update(measure(net, self.batch, batch_size=self.batch_size))
            rec["update"] = relative_updates(net, self.before[tag]) if tag in self.before else None
            self.remember({tag: net})
            if grad_net is not None and tag == "raw":
                rec.update(gradient_norms(grad_net, grad_scale) or {})
            records.append(rec)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        with open(self.path, "a") as f:
            for rec in records:
                rec.update(time=time.time(), seconds=seconds)
                f.write(json.dumps(_clean(rec)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.last_nimg = int(nimg)
        if self.writer is not None:
            for rec in records:
                for key in QUANTITIES:
                    for bucket, v in (rec.get(key) or {}).items():
                        if v is not None and math.isfinite(v):
                            self.writer.add_scalar(f"dynamics/{rec['net']}/{key}/{bucket}", v, nimg)
            self.writer.flush()
        return records

def _probe_seed(seed: int) -> int:
    """The measurement batch's own random stream of a run with this seed (independent of training's streams)."""
    return int(np.random.SeedSequence([int(seed), 0x64796E]).generate_state(1, np.uint32)[0])


class DynamicsHook:
    """A training hook (`edm2.train.loop.train(config, hooks=...)`, `edm2 train
    --dynamics N`): every `every` images (at the first maintenance point at or
    after each multiple of `every`, at image 0 of a fresh run and at the end of
    training) it measures the longest EMA network and the raw network on a
    measurement batch of `probe_size` training items and appends the records to
    the run's dynamics.jsonl. The batch (items, noise, noise levels from the run's
    P_mean/P_std) is drawn once from the run's seed, so every measurement of
    every session of the run sees the same batch. Runs on rank 0 only."""

    def __init__(self, every: int, probe_size: int = 256, batch_size: int = MEASURE_BATCH, writer=None):
        if every < 1 or probe_size < 1:
            raise EDM2Error(f"dynamics={every}, dynamics_probe={probe_size}: both must be >= 1")
        self.every, self.probe_size, self.batch_size = int(every), int(probe_size), int(batch_size)
        self.writer = writer   # the run's TensorBoard SummaryWriter (edm2.train.log.Reporter.tensorboard), or None
        self.tracker: DynamicsTracker | None = None

    def due(self, nimg: int, batch: int, start_nimg: int, duration: int) -> bool:
        if nimg == start_nimg:
            return nimg == 0                     # measured before the checkpoint a resumed run starts from
        return nimg // self.every > (nimg - batch) // self.every or nimg == duration

    def __call__(self, run) -> None:
        plan = run.plan
        if run.rank != 0:
            return
        sigma_rel = max(run.ema.nets)
        nets = {"ema": run.ema.nets[sigma_rel], "raw": run.net}
        if self.tracker is None:
            batch = measurement_batch_from_dataset(run.data, run.encoder, self.probe_size,
                                                   seed=_probe_seed(plan.seed), P_mean=plan.P_mean, P_std=plan.P_std)
            self.tracker = DynamicsTracker(run.out, batch, start_nimg=run.start_nimg, writer=self.writer,
                                           batch_size=self.batch_size)
            if run.nimg == run.start_nimg > 0 and self.tracker.last_nimg == run.nimg:
                self.tracker.remember(nets)      # so the next update spans the same interval as without the resume
        if self.due(run.nimg, plan.batch, run.start_nimg, plan.duration):
            self.tracker.measure(run.nimg, nets, grad_net=run.net, grad_scale=plan.loss_scaling,
                                 extra={"ema": {"ema_std": sigma_rel}})


def _check_new_output(path, overwrite: bool, name: str = "out") -> Path:
    """Refuse an output file that exists (unless `overwrite`) or is not a file."""
    path = Path(path)
    if path.is_dir():
        raise ExistingFileError(f"{name}={path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ExistingFileError(f"{name}={path}: already exists; choose another file or pass overwrite=True")
    return path


def measure_snapshots(run, sigma_rel: float | None = None, data=None, probe_size: int = 256, out=None,
                      device="cpu", progress: bool = False, overwrite: bool = False) -> Path:
    """Measure the stored EMA snapshots of a finished (or running) run after
    the fact, one record per snapshot, into `out` (default
    `<run>/dynamics-snapshots.jsonl`): the paper's Fig. 15 for a run
    that was trained without `--dynamics`. `sigma_rel`: which stored EMA
    (default: the longest). The measurement batch is the one `--dynamics`
    would use: the run's dataset (or `data`), seed and noise-level distribution from its
    config.json. An existing `out` is refused unless `overwrite` (and the run's own
    files, such as its training logs, always are); the file is written atomically once
    every snapshot is measured. Returns the output path."""
    run = Path(run)
    if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 1:
        raise EDM2Error(f"probe_size={probe_size!r}: must be a whole number >= 1 (items in the measurement batch)")
    if sigma_rel is not None and not (isinstance(sigma_rel, (int, float)) and math.isfinite(sigma_rel)
                                      and sigma_rel > 0):
        raise EDM2Error(f"sigma_rel={sigma_rel!r}: must be a finite number > 0 (a stored EMA length)")
    if not run.is_dir():
        raise MissingFileError(f"{run}: not a run folder")
    snaps = [r for r in list_snapshots(run) if r[1] is not None]
    if not snaps:
        raise MissingFileError(f"{run}: no EMA snapshot-*.safetensors files to measure")
    stored = sorted({r[1] for r in snaps})
    chosen = max(stored) if sigma_rel is None else float(sigma_rel)
    snaps = [r for r in snaps if abs(r[1] - chosen) < 5e-4]
    if not snaps:
        raise EDM2Error(f"sigma_rel={sigma_rel}: the run stores the EMA lengths "
                        f"{', '.join(f'{s:.3f}' for s in stored)}")
    out = Path(out) if out is not None else run / SNAPSHOTS_FILE
    if out.exists() and out.parent.resolve() == run.resolve() and out.name != SNAPSHOTS_FILE:
        raise ExistingFileError(f"out={out}: is a file of the run itself (e.g. its training log); choose another "
                                f"file (default {run / SNAPSHOTS_FILE})")
    _check_new_output(out, overwrite)
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    meta = read_snapshot_meta(snaps[0][2])
    data = data or config.get("data") or meta.get("dataset", {}).get("path")
    if data is None:
        raise EDM2Error(f"{run}: the snapshots do not say which dataset trained them; pass `data`")
    batch = measurement_batch_from_dataset(
        ImageDataset(data, use_labels=bool(meta["net_kwargs"].get("label_dim"))),
        encoder_from_meta(meta.get("encoder", {"type": "rgb"})), probe_size, seed=_probe_seed(config.get("seed", 0)),
        P_mean=config.get("P_mean", -0.4), P_std=config.get("P_std", 1.0))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Measured into a temporary file beside `out`, renamed into place at the end: an existing
    # file is never emptied, and an interrupted measurement leaves nothing behind.
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        tracker = DynamicsTracker(out.parent, batch, filename=tmp.name)
        for nimg, snap_sigma_rel, path in tqdm(snaps, desc="measuring snapshots", unit="snapshot",
                                               disable=not progress):
            net, _ = load_snapshot(path, device=device)
            tracker.measure(nimg, {"ema": net}, extra={"ema": {"ema_std": snap_sigma_rel, "snapshot": path.name}})
        move_into_place(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# ---------------------------------------------------------------------------
# Reading and drawing.
# ---------------------------------------------------------------------------

def _read_records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:   # a last line cut short by an interruption
                break
            raise EDM2Error(f"{path}: line {i + 1} is not JSON; the file is damaged") from None
        if not isinstance(rec, dict) or "nimg" not in rec:
            raise EDM2Error(f"{path}: line {i + 1} is not a dynamics record (no 'nimg')")
        out.append(rec)
    return out


def load_dynamics(run) -> list[dict]:
    """The records of a run folder's dynamics.jsonl (else its
    dynamics-snapshots.jsonl), or of such a file given directly, in file order."""
    path = Path(run)
    if path.is_dir():
        path = path / (DYNAMICS_FILE if (path / DYNAMICS_FILE).is_file() or not (path / SNAPSHOTS_FILE).is_file()
                       else SNAPSHOTS_FILE)
    if not path.is_file():
        raise MissingFileError(f"{run}: no {DYNAMICS_FILE}; record one with `edm2 train --dynamics N` "
                                f"(N = images between measurements), or measure the stored snapshots with "
                                f"`edm2 dynamics measure {run}`")
    records = _read_records(path)
    if not records:
        raise EDM2Error(f"{path}: holds no records yet")
    return records


QUANTITIES = {
    "act_max": "activations (max)",
    "act_mean": "activations (mean)",
    "weight_max": "weights (max)",
    "weight_mean": "weights (mean)",
    "update": "relative update ||Δw|| / ||w||",
}


def growth_factors(records, quantity: str = "act_max", from_nimg: int = 0) -> dict:
    """How much `quantity` grew over training, per network: {net: {"first",
    "last", "growth", "first_nimg", "last_nimg"}}, where first and last are the
    largest value over the U-Net levels at the first and the last measurement
    of that network ('ema', 'raw') and growth = last / first. The paper's
    Fig. 3 shows this growth of the activations in the configs without
    magnitude preservation (Sec. 2.2). `from_nimg`: leave out the measurements
    before this many training images (e.g. the untrained network at 0, whose
    magnitudes the first steps change in every config). Networks without that
    quantity are left out."""
    out = {}
    for net in dict.fromkeys(r.get("net") for r in records):
        recs = [r for r in _select(records, net) if r.get(quantity) and r["nimg"] >= from_nimg]
        if not recs:
            continue
        first, last = (max(v for v in r[quantity].values() if v is not None) for r in (recs[0], recs[-1]))
        out[net] = {"first": first, "last": last, "growth": last / first if first > 0 else math.inf,
                    "first_nimg": recs[0]["nimg"], "last_nimg": recs[-1]["nimg"]}
    return out


def _select(records, net: str) -> list[dict]:
    return [r for r in records if r.get("net") == net]


def _x_axis(nimg_max: int):
    for scale, unit in ((2 ** 30, "Gimg"), (2 ** 20, "Mimg"), (2 ** 10, "Kimg")):
        if nimg_max >= 4 * scale:
            return scale, unit
    return 1, "images"


def _depth_colours(buckets):
    import matplotlib  # loaded by pyplot() already; imported here, as there, only when drawing

    resolutions = sorted({int(b.split("-")[1].split("x")[0]) for b in buckets}, reverse=True)
    cmap = matplotlib.colormaps["viridis"]
    return {r: cmap(i / max(len(resolutions) - 1, 1) * 0.9) for i, r in enumerate(resolutions)}


def plot_dynamics(runs, out=None, net: str = "ema", quantities=None, labels=None, sharey: bool = False,
                  dpi: int = 100) -> bytes:
    """The paper-style figure (Fig. 3 / Fig. 15): one row per quantity, one
    column per run, one curve per bucket (colour: resolution; encoder solid,
    decoder dashed). `runs`: run folders or dynamics.jsonl files. Written
    atomically to `out` when given; returns the PNG bytes."""
    plt = pyplot()

    runs = list(runs)
    data = []
    for run in runs:
        recs = _select(load_dynamics(run), net)
        if not recs:
            raise EDM2Error(f"{run}: no records of the {net!r} network in {DYNAMICS_FILE}")
        data.append(recs)
    quantities = list(quantities or [q for q in QUANTITIES if any(r.get(q) for recs in data for r in recs)])
    unknown = [q for q in quantities if q not in QUANTITIES]
    if unknown:
        raise EDM2Error(f"quantities={','.join(unknown)}: unknown; allowed: {', '.join(QUANTITIES)}")
    labels = list(labels or [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs])
    buckets = sorted({b for recs in data for r in recs for q in quantities for b in (r.get(q) or {})},
                     key=bucket_sort_key)
    colours = _depth_colours(buckets)
    scale, unit = _x_axis(max(r["nimg"] for recs in data for r in recs))
    fig, axes = plt.subplots(len(quantities), len(runs), figsize=(3.6 * len(runs) + 1.6, 2.4 * len(quantities)),
                             squeeze=False, sharex="col", sharey="row" if sharey else False)
    for col, (recs, label) in enumerate(zip(data, labels)):
        for row, q in enumerate(quantities):
            ax = axes[row][col]
            for b in buckets:
                pts = [(r["nimg"] / scale, r[q][b]) for r in recs if (r.get(q) or {}).get(b) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    res = int(b.split("-")[1].split("x")[0])
                    ax.plot(xs, ys, "-" if b.startswith("enc") else "--", color=colours[res], linewidth=1.3,
                            label=b.replace("enc", "Enc").replace("dec", "Dec"))
            if row == 0:
                ax.set_title(label, fontsize=10)
            if col == 0:
                ax.set_ylabel(QUANTITIES[q], fontsize=8)
            if row == len(quantities) - 1:
                ax.set_xlabel(unit)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"{net.upper() if net == 'ema' else net} network: magnitudes per U-Net level", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    return save_figure(fig, out, dpi=dpi)


def plot_loss_profile(runs, out=None, net: str = "ema", labels=None, dpi: int = 100) -> bytes:
    """Loss per noise level and the learned u(sigma): left, lambda(sigma)·L(sigma)
    per bin at the last measurement of each run (solid) with exp(u(sigma))
    (dashed; the uncertainty loss drives exp(u) towards the weighted loss,
    paper App. B.2); right, the last u(sigma) of each run. Written atomically to `out`."""
    plt = pyplot()
    import matplotlib  # for its colormaps; already loaded by pyplot()

    runs = list(runs)
    labels = list(labels or [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs])
    fig, (ax_l, ax_u) = plt.subplots(1, 2, figsize=(10, 3.8))
    cmap = matplotlib.colormaps["tab10"]
    for i, (run, label) in enumerate(zip(runs, labels)):
        recs = [r for r in _select(load_dynamics(run), net) if r.get("loss")]
        if not recs:
            raise EDM2Error(f"{run}: no loss records of the {net!r} network in {DYNAMICS_FILE}")
        last = recs[-1]
        colour = cmap(i % 10)
        ax_l.plot(last["loss_sigma"], last["loss"], "o-", color=colour, label=f"{label} (nimg {last['nimg']:,})")
        if last.get("u"):
            ax_l.plot(last["u_sigma"], np.exp(last["u"]), "--", color=colour, alpha=0.7, label=f"{label}: exp(u)")
            ax_u.plot(last["u_sigma"], last["u"], "-", color=colour, label=label)
    ax_l.set_xscale("log")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("sigma")
    ax_l.set_ylabel("lambda(sigma) · ||D - y||² per element")
    ax_l.set_title("loss per noise level", fontsize=10)
    ax_l.grid(alpha=0.3, which="both")
    ax_l.legend(fontsize=7)
    ax_u.set_xscale("log")
    ax_u.set_xlabel("sigma")
    ax_u.set_ylabel("u(sigma)")
    ax_u.set_title("learned uncertainty u(sigma)", fontsize=10)
    ax_u.grid(alpha=0.3, which="both")
    if ax_u.lines:
        ax_u.legend(fontsize=7)
    else:
        ax_u.text(0.5, 0.5, "no u(sigma) in these networks", ha="center", va="center", transform=ax_u.transAxes)
    fig.tight_layout()
    return save_figure(fig, out, dpi=dpi)
