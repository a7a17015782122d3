"""Devices, processes and CPU threads: the one place that decides where and
how wide edm2 runs.

- `default_device()`: `cuda:LOCAL_RANK` when CUDA is there (one GPU per
  torchrun process), else the CPU; `resolve_device(device)` turns an optional
  user choice into a torch.device, falling back to it, and refuses a device
  this machine does not have (every command's --device goes through it).
- `init_distributed()` / `rank_world()` / `shutdown_distributed()`: join,
  query and leave the process group torchrun describes in the environment
  (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, ...). Without torchrun every
  function works as a single process of rank 0.
- `configure_threads(threads=None)`: the number of CPU threads PyTorch uses
  for its operations in this process.

CPU threads: PyTorch's own default is one thread per core, which on a machine
with few cores that are also busy with other work ran many times slower than
a single thread (OpenMP threads spin while waiting for each other). The
commands `edm2 generate`, `edm2 metrics ...`, `edm2 sweep` and `edm2 dataset
encode|decode` therefore call `configure_threads()`, which picks, in order:

1. the `threads` argument, when a caller passes one;
2. the environment variable OMP_NUM_THREADS, when set (e.g.
   `OMP_NUM_THREADS=8 edm2 generate ...` to use eight threads);
3. otherwise min(available cores, 4), divided between the processes that
   torchrun starts on this machine (LOCAL_WORLD_SIZE), and at least 1.

Library functions never change the thread count themselves; a script that
calls them can call `configure_threads()` (or `torch.set_num_threads`) first.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import EDM2Error

# Upper limit of the automatic thread count (more rarely pays off for edm2's CPU work).
DEFAULT_MAX_THREADS = 4


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is there (one GPU per torchrun process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_device(device=None, name: str = "device") -> torch.device:
    """`device` (a torch.device or a name like 'cpu', 'cuda:1') as a torch.device; None or '':
    `default_device()`. 'cuda' without an index is this process's GPU, cuda:LOCAL_RANK (as
    `default_device`), so that every CUDA call that needs an index (torch.cuda.set_device, memory
    statistics) gets one. A device this machine does not have (CUDA without a GPU, cuda:3 with two
    GPUs, mps without Apple's GPU, a misspelling) is refused with an `EDM2Error` naming the argument
    `name`: every command's --device goes through here, so all refuse it alike, before any work."""
    if device is None or device == "":
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise EDM2Error(f"{name}={device}: not a device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise EDM2Error(f"{name}={device}: CUDA is not available here (no GPU, or PyTorch built without "
                            f"CUDA); use {name}=cpu")
        given = resolved
        if resolved.index is None:
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        count = torch.cuda.device_count()
        if resolved.index >= count:
            means = "" if given.index is not None else f" (cuda means cuda:LOCAL_RANK = {resolved})"
            raise EDM2Error(f"{name}={device}{means}: this process sees {count} GPU(s), cuda:0 to "
                            f"cuda:{count - 1}; choose one of them")
    elif resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise EDM2Error(f"{name}={device}: Apple's GPU (MPS) is not available here; use {name}=cpu")
    return resolved


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (NCCL on
    GPUs, gloo on CPUs); a no-op for a single process or when already joined.
    Returns (rank, world_size)."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(default_device())
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return rank_world()


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of this process in the current process group, or (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shutdown_distributed() -> None:
    """Leave the process group, if this process is in one of several processes."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.destroy_process_group()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None) -> int:
    """Set the number of CPU threads PyTorch uses in this process and return it:
    `threads` if given, else $OMP_NUM_THREADS if set, else min(available cores,
    DEFAULT_MAX_THREADS) divided between torchrun's local processes (at least 1).
    See the module docstring for why."""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env:
            try:
                threads = int(env)
            except ValueError:
                raise EDM2Error(f"OMP_NUM_THREADS={env!r}: expected a whole number of threads, e.g. "
                                 f"OMP_NUM_THREADS=4") from None
            if threads < 1:
                raise EDM2Error(f"OMP_NUM_THREADS={env}: the number of CPU threads must be >= 1")
        else:
            local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            threads = max(1, min(available_cores(), DEFAULT_MAX_THREADS) // local)
    elif threads < 1:
        raise EDM2Error(f"threads={threads}: the number of CPU threads must be >= 1")
    torch.set_num_threads(threads)
    return threads
