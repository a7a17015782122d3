"""Data pipeline throughput: `convert_dataset` images/s at 64×64 and
`ImageDataset` + DataLoader reading images/s with 0 and 2 worker processes.

    .venv/bin/python benchmarks/data.py [--num 2000] [--out data.md]

The source is a folder of synthetic 96×80 RGB PNGs in 10 class sub-folders
(smooth gradients plus noise, so PNG compression does real work), converted
with --resolution 64 --transform center-crop to a zip, which is then read.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edm2.data import ImageDataset, convert_dataset


def make_source(root: Path, num: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:80, 0:96]
    for i in range(num):
        base = np.stack([(xx * rng.uniform(1, 3)) % 256, (yy * rng.uniform(1, 3)) % 256,
                         np.full_like(xx, rng.integers(0, 256))], axis=2)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = root / f"class{i % 10}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)


def time_convert(src: Path, dest: Path, threads: int) -> float:
    t = time.perf_counter()
    r = convert_dataset(src, dest, resolution=64, transform="center-crop", workers=threads, progress=False)
    return r.num_images / (time.perf_counter() - t)


def time_reader(path: Path, workers: int, batch: int, epochs: int) -> float:
    ds = ImageDataset(path, xflip=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    next(iter(loader))  # start-up of the workers is not counted
    t = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for x, _y in loader:
            n += len(x)
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=2000, help="images in the synthetic source")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1, help="reader passes over the (x-flipped, 2N) dataset")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_source(tmp / "src", args.num)
        for threads in (1, 4):
            ips = time_convert(tmp / "src", tmp / f"out{threads}.zip", threads)
            rows.append((f"convert folder -> zip, 96x80 -> 64x64 center-crop, {threads} thread(s)", ips))
        for workers in (0, 2):
            ips = time_reader(tmp / "out4.zip", workers, args.batch, args.epochs)
            rows.append((f"read zip, DataLoader batch {args.batch}, xflip, shuffle, {workers} workers", ips))

    load = os.getloadavg()
    lines = [f"Data pipeline throughput ({args.num} images of 64x64x3; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at the end)", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "| what | images/s |", "|---|---:|"]
    lines += [f"| {what} | {ips:,.0f} |" for what, ips in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
