"""Forward and forward+backward time per image of the EDM2 network on CPU (fp32).

    python benchmarks/network.py [--presets img512-xs,cpu-32] [--batch 2] [--repeats 3] [--compile] [--out FILE.md]

For each preset: seconds per image for an eval-mode forward pass (the
sampler's workload) and a training-mode forward+backward pass (the trainer's),
eager and, with --compile, torch.compile'd. The last column turns the
time into achieved GFLOP/s from the MAC count of edm2.analysis.flops (forward = 1x,
forward+backward = 3x the forward MACs), which shows how close the run is
to the machine's convolution throughput.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from edm2.analysis.flops import count_network
from edm2.nn import Precond
from edm2.presets import get_preset


def bench(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(preset: str, batch: int, repeats: int, compiled: bool, label_dim: int = 1000):
    p = get_preset(preset)
    torch.manual_seed(0)
    net = Precond(**p.net_kwargs(label_dim))
    with torch.no_grad():  # non-zero gains, as in a trained network
        for q in net.parameters():
            if q.ndim == 0:
                q.fill_(0.5)
    x = torch.randn(batch, p.img_channels, p.img_resolution, p.img_resolution)
    sigma = torch.rand(batch) * 5 + 0.1
    labels = torch.eye(label_dim)[torch.arange(batch) % label_dim] if label_dim else None
    model = torch.compile(net) if compiled else net

    def forward():
        net.eval()
        with torch.no_grad():
            model(x, sigma, labels)

    def forward_backward():
        net.train()
        d, logvar = model(x, sigma, labels, return_logvar=True)
        (d.square().mean() + logvar.mean()).backward()
        net.zero_grad(set_to_none=True)

    fwd = bench(forward, repeats) / batch
    fb = bench(forward_backward, repeats) / batch
    macs = count_network(preset, label_dim=label_dim).macs_matmul
    return dict(preset=preset, mode="compile" if compiled else "eager", batch=batch, fwd=fwd, fb=fb,
                gflops_fwd=2 * macs / fwd / 1e9, gflops_fb=6 * macs / fb / 1e9)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="img512-xs,cpu-32")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args()

    rows = []
    for preset in args.presets.split(","):
        for compiled in ([False, True] if args.compile else [False]):
            rows.append(run(preset, args.batch, args.repeats, compiled))
            print(rows[-1], flush=True)
    lines = [
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32, batch {args.batch}, best of {args.repeats}",
        "",
        "| preset | mode | forward s/img | fwd+bwd s/img | fwd GFLOP/s | fwd+bwd GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['mode']} | {r['fwd']:.3f} | {r['fb']:.3f} | "
                     f"{r['gflops_fwd']:.0f} | {r['gflops_fb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
