"""Cost of the training-dynamics tracker (`edm2 train --dynamics N`).

Trains the cpu-32 preset on the built-in Fashion-MNIST for a short while
with the tracker measuring every `--every` images, then relates the time of
one measurement (the `seconds` field of dynamics.jsonl: both networks, EMA
and raw, on the probe batch) to the time of one training step (stats.jsonl:
seconds per image, maintenance excluded). The overhead at a measurement
interval of N images is t_measure / (N x t_image). On a shared machine both
times stretch alike, so their ratio is what this reports.

    python benchmarks/dynamics.py [--images 1024] [--every 256] [--interval 8192] [--probe 256] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024, help="training images (default 1024 = 32 steps)")
    ap.add_argument("--every", type=int, default=256, help="images between measurements in this run")
    ap.add_argument("--interval", type=int, default=8192, help="interval to report the overhead at "
                    "(default 8192: the cpu-32 snapshot interval)")
    ap.add_argument("--probe", type=int, default=256, help="probe batch size (default 256)")
    ap.add_argument("--workdir", default=None, help="run folder parent (default: a temporary folder)")
    args = ap.parse_args(argv)

    import torch

    from edm2.training import TrainConfig, train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edm2-dynamics-bench-"))
    out = work / "run"
    load0 = os.getloadavg()[0]
    t0 = time.time()
    train(TrainConfig(outdir=str(out), preset="cpu-32", duration=args.images, status=args.every,
                      snapshot=args.images, checkpoint=args.images, grid=0, dynamics=args.every,
                      dynamics_probe=args.probe, progress=False))
    wall = time.time() - t0
    load1 = os.getloadavg()[0]

    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    per_img = [1 / r["img_per_sec"] for r in stats if r.get("img_per_sec")]
    dyn = [json.loads(line) for line in (out / "dynamics.jsonl").read_text().splitlines()]
    meas = sorted({(r["nimg"], r["seconds"]) for r in dyn})
    t_meas = statistics.median(s for _, s in meas[1:] or meas)     # the first one includes warm-up
    t_img = statistics.median(per_img)
    t_step = t_img * 32
    overhead = t_meas / (args.interval * t_img)
    print(f"cpu-32, batch 32, {torch.get_num_threads()} thread(s), probe {args.probe} items, "
          f"{len(meas)} measurements over {args.images} images; wall {wall:.0f} s; load {load0:.1f} -> {load1:.1f}")
    print(f"training: {t_step:.3f} s per step ({t_img * 1000:.1f} ms per image, median of {len(per_img)} status "
          f"intervals)")
    print(f"one measurement (EMA + raw network): {t_meas:.2f} s (median; all: "
          f"{', '.join(f'{s:.2f}' for _, s in meas)})")
    print(f"overhead at one measurement per {args.interval} images: {100 * overhead:.2f}% of the training time "
          f"(= {t_meas:.2f} s / ({args.interval} x {t_img * 1000:.1f} ms))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
