"""Output of a training run besides snapshots and checkpoints: status lines
(terminal and log.txt), stats.jsonl records, the optional logging backends
(`--log tensorboard,wandb`) and sample-grid PNGs.

Backends (`log` argument, comma-separated; default none, so a run's output
never depends on which packages happen to be installed):

- `tensorboard`: scalars `train/<name>` into OUTDIR/tensorboard/ (extra
  `edm2[tensorboard]`). The x-axis is the number of training images (step)
  and the wall-clock time of the record (TensorBoard's "relative"/"wall" axes);
  `nimg`, `kimg` and `time` are therefore not scalars of their own.
- `wandb`: Weights & Biases (extra `edm2[wandb]`): one W&B run (project
  "edm2") per training run, named after OUTDIR and continued on resume (a
  --force-new restart is a new one); scalars `train/<name>` against the step metric `nimg`, with
  `kimg` logged beside it. Offline: set WANDB_MODE=offline.

A backend that is not installed is refused before anything is written
(`parse_log_backends`), naming the pip command.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, PngImagePlugin

from ..sampling import SeedRandom, sample_batch
from ..utils.distributed import resolve_device
from ..utils.errors import EDM2Error
from ..utils.fileio import atomic_write_bytes

LOG_BACKENDS = ("tensorboard", "wandb")
_AXES = ("nimg", "kimg", "time")   # the x-axes of a record (step, its kimg, wall clock): not scalars


def parse_log_backends(log) -> tuple[str, ...]:
    """The `log` argument ('tensorboard,wandb', a list, None or '' for none) -> the backends,
    each known and installed; otherwise one EDM2Error naming the fix."""
    if log is None or log == "" or log == "none":
        return ()
    names = [n.strip() for n in (log.split(",") if isinstance(log, str) else log)]
    names = [n for n in names if n]
    for n in names:
        if n not in LOG_BACKENDS:
            raise EDM2Error(f"log={log}: unknown logging backend {n!r}; choose from {', '.join(LOG_BACKENDS)} "
                            f"(comma-separated)")
    for n in names:
        try:
            _import_backend(n)
        except ImportError:
            raise EDM2Error(f"log={log}: the {n} package is not installed; pip install 'edm2[{n}]' "
                            f"(or pip install {n}), or leave {n} out") from None
    return tuple(dict.fromkeys(names))


def _import_backend(name: str):
    """The backend's module (imported only when asked for: both are slow to import)."""
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter
    import wandb
    return wandb


class Reporter:
    """Status lines to the terminal and log.txt, records to stats.jsonl and
    the logging backends (rank 0 only; the others stay silent).

    `tensorboard` is the run's one `SummaryWriter` (into OUTDIR/tensorboard/;
    None unless `log` names tensorboard, and on ranks other than 0):
    whatever else logs scalars during training (e.g. the `--dynamics` hook) is
    given this writer rather than opening its own. `wandb` is the W&B run (or
    None). `close()` closes both."""

    def __init__(self, outdir: Path | None, active: bool, bar=None, log=None, run_id: str | None = None,
                 config: dict | None = None):
        self.outdir, self.active, self.bar, self.tensorboard, self.wandb = outdir, active, bar, None, None
        backends = parse_log_backends(log)
        if not (active and outdir is not None):
            return
        if "tensorboard" in backends:
            self.tensorboard = _import_backend("tensorboard")(str(outdir / "tensorboard"))
        if "wandb" in backends:
            wandb = _import_backend("wandb")
            self.wandb = wandb.init(project="edm2", name=Path(outdir).resolve().name, dir=str(outdir),
                                    id=run_id, resume="allow" if run_id else None, config=config)
            self.wandb.define_metric("nimg")
            self.wandb.define_metric("*", step_metric="nimg")

    def log(self, msg: str) -> None:
        if not self.active:
            return
        (self.bar.write if self.bar is not None else print)(msg)
        if self.outdir is not None:
            with open(self.outdir / "log.txt", "a") as f:
                f.write(msg + "\n")

    def stats(self, record: dict) -> None:
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.outdir / "stats.jsonl", "a") as f:
            f.write(json.dumps(clean) + "\n")  # strict JSON: NaN (no images yet) becomes null
        scalars = {f"train/{k}": v for k, v in record.items()
                   if k not in _AXES and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, global_step=record["nimg"], walltime=record.get("time"))
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({"nimg": record["nimg"], "kimg": record["nimg"] / 1000, **scalars})

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def peak_memory(device) -> tuple[float, float]:
    """(peak CPU resident memory, peak GPU memory allocated), GiB."""
    cpu = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30  # ru_maxrss is KiB on Linux
    gpu = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0
    return cpu, gpu


GRID_BATCH = 32  # grid images per sampler call, whatever the number of rows and columns


GRID_OWNER_KEY = "edm2-run"   # PNG text chunk of a training grid: the run id of the run that wrote it


def grid_owner(path) -> str | None:
    """The run id stored in a sample grid written by `save_grid` (None: not such a grid)."""
    try:
        with Image.open(path) as im:
            return im.text.get(GRID_OWNER_KEY) if im.format == "PNG" else None
    except Exception:  # not an image, unreadable, a folder: not a grid of ours
        return None


def check_grid_owner(path, owner: str) -> None:
    """`EDM2Error` when `path` exists and is not a sample grid of the run `owner`:
    writing the grid there would replace a file the run does not own."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and grid_owner(path) != owner:
        raise EDM2Error(f"outdir={path.parent}: {path.name} is not a sample grid of this run, and training would "
                        f"replace it; move it out of the run folder, or pass grid=0 (no sample grids)")


def save_grid(path, net, encoder, count: int, device, owner: str = "") -> None:
    """A PNG of `count` samples (EDM sampler, App. D.1, seeds 0, 1, ...): for a
    conditional net one row per class (first 10 classes, same seeds in every
    row), else a near-square grid. Rows are batched together (a one-column
    grid of 10 classes is one sampler call, not ten). `owner` (the run id) is
    stored in the PNG as text `edm2-run`; a file at `path` that is not a grid
    of the same owner is refused (`check_grid_owner`), not replaced."""
    check_grid_owner(path, owner)
    rows = min(net.label_dim, 10) if net.label_dim else max(int(math.sqrt(count)), 1)
    cols = max(math.ceil(count / rows), 1)
    seeds = [c for _ in range(rows) for c in range(cols)] if net.label_dim else list(range(rows * cols))
    classes = torch.arange(rows).repeat_interleave(cols) if net.label_dim else None
    net.eval().requires_grad_(False)
    device = resolve_device(device)
    images = []
    for i in range(0, len(seeds), GRID_BATCH):
        rnd = SeedRandom(seeds[i:i + GRID_BATCH], device)
        labels = None if classes is None else classes[i:i + GRID_BATCH]
        images.append(sample_batch(net, encoder, rnd, class_idx=labels)[0])
    x = torch.cat(images)                                           # [rows*cols, C, H, W] uint8
    c, h, w = x.shape[1:]
    x = x.reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c).cpu().numpy()
    info = PngImagePlugin.PngInfo()
    info.add_text(GRID_OWNER_KEY, owner)
    buf = io.BytesIO()
    Image.fromarray(x[:, :, 0] if c == 1 else x).save(buf, format="PNG", pnginfo=info, compress_level=6)
    atomic_write_bytes(path, buf.getvalue())


class StatusMeter:
    """The counters between two status lines: the summed training loss and its
    count (all-reduced over processes when reported), and the time spent, less
    the time of maintenance (snapshots, grids, checkpoints)."""

    def __init__(self, device, world: int, nimg: int):
        self.device, self.world = device, world
        self.maintenance_seconds = 0.0
        self._reset(time.time(), nimg)

    def _reset(self, now: float, nimg: int) -> None:
        self.t_last, self.nimg_last = now, nimg
        self.loss_sum = torch.zeros([], dtype=torch.float64, device=self.device)
        self.loss_count = 0

    def add_loss(self, loss: torch.Tensor) -> None:
        """Count the per-sample losses of one micro-batch."""
        self.loss_sum += loss.detach().sum().double()
        self.loss_count += loss.numel()

    @contextlib.contextmanager
    def maintenance(self):
        """Time spent in this block does not count as training time."""
        t0 = time.time()
        try:
            yield
        finally:
            self.maintenance_seconds += time.time() - t0

    def report(self, rep: Reporter, nimg: int, lr: float) -> dict:
        """Report the interval since the last status (all processes take part); start a new one."""
        stats = torch.stack([self.loss_sum, torch.tensor(float(self.loss_count), dtype=torch.float64,
                                                         device=self.device)])
        if self.world > 1:
            dist.all_reduce(stats)
        now = time.time()
        span = max(now - self.t_last - self.maintenance_seconds, 1e-9)
        done = nimg - self.nimg_last
        loss = float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")
        cpu_mem, gpu_mem = peak_memory(self.device)
        record = dict(nimg=nimg, kimg=nimg / 1000, sec_per_kimg=span / done * 1000 if done else float("nan"),
                      img_per_sec=done / span if done else float("nan"), loss=loss, lr=lr,
                      cpu_mem_gib=round(cpu_mem, 3), gpu_mem_gib=round(gpu_mem, 3), time=now)
        rep.log(f"kimg {nimg / 1000:<9.3f} sec/kimg {record['sec_per_kimg']:<8.2f} "
                f"img/s {record['img_per_sec']:<7.1f} loss {loss:<8.4f} lr {lr:<9.3e} "
                f"cpumem {cpu_mem:<6.2f} gpumem {gpu_mem:.2f}")
        rep.stats(record)
        self._reset(now, nimg)
        self.maintenance_seconds = 0.0
        return record
