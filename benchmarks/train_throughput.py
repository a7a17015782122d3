"""Training throughput: images/s and peak memory of `edm2.train.loop.train`
(the real loop: data, loss, backward, Adam, EMA) for the cpu-32 preset
(32x32x1, its own batch) and img512-xs (64x64x4 latents, batch 2), eager and
torch.compile. Each case runs in its own process (so peak memory is its own)
on a small synthetic dataset; the first `--warmup` steps (compilation) are
not timed.

    .venv/bin/python benchmarks/train_throughput.py [--cases cpu-32,img512-xs]
        [--modes eager,compile] [--steps 4] [--warmup 2] [--out FILE.md]

Prints a markdown table (and writes it to --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# case -> (preset, resolution, dataset channels, latent?, batch, classes)
CASES = {
    "cpu-32": ("cpu-32", 32, 1, False, 32, 10),
    "img512-xs": ("img512-xs", 64, 8, True, 2, 1000),
}


def make_dataset(folder: Path, res: int, channels: int, latent: bool, classes: int, n: int = 16) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = []
    for i in range(n):
        if latent:
            name = f"{i:03d}.npy"
            np.save(folder / name, rng.normal(0, 3, [channels, res, res]).astype(np.float32))
        else:
            name = f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, [res, res], dtype=np.uint8)).save(folder / name)
        labels.append([name, (classes - 1) if i == 0 else int(rng.integers(classes))])
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))


def child(case: str, mode: str, steps: int, warmup: int, workdir: Path) -> dict:
    """Train warmup + steps steps; img/s from the status records after the warmup."""
    import torch

    from edm2.train.loop import TrainConfig, train

    preset, res, ch, latent, batch, classes = CASES[case]
    data = workdir / "data"
    make_dataset(data, res // 8 if latent else res, ch, latent, classes)
    out = workdir / "run"
    train(TrainConfig(outdir=str(out), data=str(data), preset=preset, batch=batch,
                      duration=(warmup + steps) * batch, status=batch, snapshot=(warmup + steps) * batch,
                      checkpoint=(warmup + steps) * batch, grid=0, compile=mode == "compile", progress=False))
    # One status record per step; time the steps after the warm-up.
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["nimg"] > warmup * batch]
    seconds = sum(batch / r["img_per_sec"] for r in timed)
    last = records[-1]
    return dict(case=case, mode=mode, batch=batch, img_per_sec=len(timed) * batch / seconds,
                cpu_mem_gib=last["cpu_mem_gib"], gpu_mem_gib=last["gpu_mem_gib"],
                device="cuda" if torch.cuda.is_available() else "cpu", threads=torch.get_num_threads())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="cpu-32,img512-xs")
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(child(*args.child, args.steps, args.warmup, Path(tmp))))
        return

    rows = []
    for case in args.cases.split(","):
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--child", case, mode, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                rows.append(dict(case=case, mode=mode, error=proc.stderr.strip().splitlines()[-1][:120]))
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)

    lines = ["| case | mode | batch | img/s | peak CPU RSS (GiB) | peak GPU (GiB) | device | threads |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['mode']} | | error: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['case']} | {r['mode']} | {r['batch']} | {r['img_per_sec']:.2f} "
                         f"| {r['cpu_mem_gib']:.2f} | {r['gpu_mem_gib']:.2f} | {r['device']} | {r['threads']} |")
    cpu = platform.processor() or platform.machine()
    lines.append(f"\n{args.steps} timed steps after {args.warmup} warm-up steps; {cpu}, {os.cpu_count()} CPUs.")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
