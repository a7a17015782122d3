"""Cost of the training-dynamics tracker (`edm2 train --dynamics N`).

Trains the cpu-32 preset on the built-in Fashion-MNIST for a short while
with the tracker measuring every `--every` images, and times, in the same
process, the tracker hook itself (every call: drawing the probe batch on the
first call, then each measurement of both networks, EMA and raw, on the probe
batch, and writing dynamics.jsonl) and the training loop without it. The
machine may be shared: both times stretch alike under load, so their ratio is
what this reports, not the seconds.

The cost of a run of D images measured every N images (D/N + 1 measurements,
the first one with the probe set-up) is

    (t_first + (D / N) x t_measure) / (D x t_image)

with t_image the training loop's seconds per image without the hook. The
defaults give it for the cpu-32 preset (D = 16Ki, N = 8Ki: its snapshot
interval).

    python benchmarks/dynamics.py [--images 1024] [--every 256] [--interval 8192] [--duration 16384]
                                  [--probe 256] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024, help="training images of this run (default 1024 = 32 steps)")
    ap.add_argument("--every", type=int, default=256, help="images between measurements in this run")
    ap.add_argument("--interval", type=int, default=8192, help="interval N to report the cost at "
                    "(default 8192: the cpu-32 snapshot interval)")
    ap.add_argument("--duration", type=int, default=16384, help="run length D to report the cost at "
                    "(default 16384: the cpu-32 duration)")
    ap.add_argument("--probe", type=int, default=256, help="probe batch size (default 256, as --dynamics-probe)")
    ap.add_argument("--workdir", default=None, help="run folder parent (default: a temporary folder)")
    args = ap.parse_args(argv)

    import torch

    import edm2.train.loop as training
    from edm2.analysis.dynamics import DynamicsHook
    from edm2.train.loop import TrainConfig, train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edm2-dynamics-bench-"))
    hook_calls: list[tuple[int, float, bool]] = []       # (nimg, seconds, measured)
    loop_seconds = []

    class TimedHook(DynamicsHook):
        def __call__(self, run):
            due = self.due(run.nimg, run.plan.batch, run.start_nimg, run.plan.duration)
            t0 = time.perf_counter()
            super().__call__(run)
            hook_calls.append((run.nimg, time.perf_counter() - t0, due))

    real_loop = training.train_loop

    def timed_loop(run):
        t0 = time.perf_counter()
        try:
            return real_loop(run)
        finally:
            loop_seconds.append(time.perf_counter() - t0)

    training.train_loop = timed_loop
    load0 = os.getloadavg()[0]
    try:
        train(TrainConfig(outdir=str(work / "run"), preset="cpu-32", duration=args.images, status=args.images,
                          snapshot=args.images, checkpoint=args.images, grid=0, progress=False),
              hooks=(TimedHook(args.every, args.probe),))
    finally:
        training.train_loop = real_loop
    load1 = os.getloadavg()[0]

    hook_total = sum(s for _, s, _ in hook_calls)
    measured = [(n, s) for n, s, m in hook_calls if m]
    t_first = measured[0][1]
    t_meas = statistics.median(s for _, s in measured[1:])
    idle = hook_total - sum(s for _, s in measured)           # calls that only checked whether one is due
    t_img = (loop_seconds[0] - hook_total) / args.images
    d, n = args.duration, args.interval
    cost = (t_first + (d // n) * t_meas) / (d * t_img)
    print(f"cpu-32, batch 32, {torch.get_num_threads()} thread(s), probe {args.probe} items; this run: "
          f"{args.images} images, {len(measured)} measurements; load {load0:.1f} -> {load1:.1f}")
    print()
    print("| quantity | value |")
    print("|---|---|")
    print(f"| training loop without the hook | {t_img * 1000:.1f} ms per image |")
    print(f"| first measurement (probe set-up + EMA and raw network) | {t_first:.2f} s |")
    print(f"| later measurements (median of {len(measured) - 1}) | {t_meas:.2f} s "
          f"({', '.join(f'{s:.2f}' for _, s in measured[1:])}) |")
    print(f"| hook calls without a measurement ({len(hook_calls) - len(measured)}) | {idle * 1000:.1f} ms in all |")
    print(f"| hook share of this run | {100 * hook_total / loop_seconds[0]:.1f}% |")
    print(f"| **cost of --dynamics {n} over {d} images** ({d // n + 1} measurements) | **{100 * cost:.2f}%** "
          f"of the training time |")
    print(f"| steady state: one measurement per {n} images | {100 * t_meas / (n * t_img):.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
