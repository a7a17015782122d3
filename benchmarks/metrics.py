"""Throughput of the metric detectors (random weights: the speed does not
depend on them) and of the Fréchet distance, printed as a markdown table.

    .venv/bin/python benchmarks/metrics.py [--batch 64] [--metrics fid,fd_dinov2,fd_tiny] [--out FILE.md]

Each detector first runs one warm-up batch of 2 images, then `--iters` timed
batches of `--batch` random 64x64 RGB uint8 images (the detectors resize to
their own input size: 299 for Inception, 224 for DINOv2).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from edm2.metrics import frechet_distance, random_detector


def time_detector(metric: str, batch: int, iters: int, device: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    det = random_detector(metric, device=device)
    build = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, [batch, 3, 64, 64], dtype=torch.uint8, generator=g).to(device)
    det(x[:2])  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        det(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t0), build


def time_fd(dim: int) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal([dim, dim + 100]), rng.standard_normal([dim, dim + 100])
    s1, s2 = a @ a.T / dim, b @ b.T / dim
    t0 = time.perf_counter()
    frechet_distance(np.zeros(dim), s1, np.ones(dim), s2)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--metrics", default="fid,fd_dinov2,fd_tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args()

    lines = [f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), batch {args.batch}", "",
             "| detector | features | images/s | build s |", "|---|---|---|---|"]
    dims = {"fid": 2048, "fd_dinov2": 1024, "fd_tiny": 16}
    for metric in args.metrics.split(","):
        rate, build = time_detector(metric, args.batch, args.iters, args.device)
        lines.append(f"| {metric} | {dims.get(metric, '?')} | {rate:.2f} | {build:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", "| Fréchet distance | seconds |", "|---|---|"]
    for dim in (1024, 2048):
        lines.append(f"| {dim}-d | {time_fd(dim):.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
