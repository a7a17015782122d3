"""Sampling speed: seconds per network evaluation of img512-xs (batch 4,
64x64x4 latents, 1000 classes) and images/second of full 32-step sampling
with the CPU preset, eager and torch.compile'd. Randomly initialised
networks (speed does not depend on the weights' values).

    python benchmarks/sampling.py [--out sampling.md]
    python benchmarks/sampling.py --evals 2 --cpu-images 8 --no-compile   # quick check
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from edm2.generate import compile_for_inference, generate_images
from edm2.nn import Precond
from edm2.presets import get_preset


def make_net(preset: str, label_dim: int):
    torch.manual_seed(0)
    return Precond(**get_preset(preset).net_kwargs(label_dim)).eval().requires_grad_(False)


def time_evals(net, batch: int, label_dim: int, evals: int) -> tuple[float, float]:
    """(first call s, best of `evals` s) for one D(x; sigma) evaluation."""
    p = net
    x = torch.randn([batch, p.img_channels, p.img_resolution, p.img_resolution])
    labels = torch.nn.functional.one_hot(torch.arange(batch) % label_dim, label_dim).float() if label_dim else None
    sigma = torch.tensor(2.5)
    with torch.no_grad():
        t = time.perf_counter()
        net(x, sigma, labels)
        first = time.perf_counter() - t
        best = float("inf")
        for _ in range(evals):
            t = time.perf_counter()
            net(x, sigma, labels)
            best = min(best, time.perf_counter() - t)
    return first, best


def time_images(net, encoder, images: int, batch: int, steps: int) -> tuple[float, float]:
    """(warm-up s, images/s) for full sampling + decoding with generate_images."""
    t = time.perf_counter()
    for _ in generate_images(net, encoder, range(batch), batch_size=batch, device="cpu", num_steps=steps):
        pass
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in generate_images(net, encoder, range(1000, 1000 + images), batch_size=batch, device="cpu",
                             num_steps=steps):
        pass
    return warm, images / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net-preset", default="img512-xs")
    ap.add_argument("--batch", type=int, default=4, help="batch for the per-evaluation timing")
    ap.add_argument("--evals", type=int, default=5, help="timed evaluations (best is reported)")
    ap.add_argument("--cpu-preset", default="cpu-32")
    ap.add_argument("--cpu-label-dim", type=int, default=10, help="classes of the CPU-preset net (Fashion-MNIST: 10)")
    ap.add_argument("--cpu-batch", type=int, default=64)
    ap.add_argument("--cpu-images", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-compile", action="store_true", help="eager only (compiling takes minutes on a CPU)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from edm2.encoders import StandardRGBEncoder

    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    rows = []
    for mode in modes:
        net = make_net(args.net_preset, 1000)
        net = compile_for_inference(net) if mode == "compiled" else net
        first, best = time_evals(net, args.batch, 1000, args.evals)
        rows.append((f"{args.net_preset} D(x;σ), batch {args.batch}, 64×64×4", mode, f"{best:.3f} s/eval",
                     f"{first:.1f} s"))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    for mode in modes:
        net = make_net(args.cpu_preset, args.cpu_label_dim)
        net = compile_for_inference(net) if mode == "compiled" else net
        warm, ips = time_images(net, StandardRGBEncoder(), args.cpu_images, args.cpu_batch, args.steps)
        p = get_preset(args.cpu_preset)
        rows.append((f"{args.cpu_preset} {args.steps}-step sampling, batch {args.cpu_batch}, "
                     f"{p.img_resolution}×{p.img_resolution}×{p.img_channels}, {args.cpu_images} images", mode,
                     f"{ips:.2f} img/s", f"{warm:.1f} s"))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)

    cpu = platform.processor() or platform.machine()
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}",
             "", "| what | mode | speed | first call / warm-up (incl. compile) |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
