"""Speed and parity of edm2's network against the authors' own implementation,
interleaved in one process on identical weights.

    python benchmarks/reference.py --ref PATH [--preset img512-xs] [--batches 2,4] [--repeats 3] [--out FILE.md]

PATH is a checkout of https://github.com/NVlabs/edm2 (its `training/` and
`torch_utils/` are imported from there at run time; nothing of it is part of
this repository). Both networks are created from the same seed, so their
state dicts are identical (checked); the gains are set to 0.5 so that the
output is not trivially zero. For each batch size the two run alternately
(forward in eval mode; forward+backward in training mode) and the best of
`--repeats` is reported, with the largest output difference.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from edm2.nn import Precond
from edm2.presets import get_preset


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True, help="checkout of NVlabs/edm2 (the authors' code)")
    ap.add_argument("--preset", default="img512-xs")
    ap.add_argument("--batches", default="2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args()

    ref = Path(args.ref)
    if not (ref / "training" / "networks_edm2.py").is_file():
        sys.exit(f"--ref {ref}: no training/networks_edm2.py there; pass a checkout of NVlabs/edm2")
    sys.path.insert(0, str(ref))  # the authors' classes are imported from their checkout
    from training.networks_edm2 import Precond as RefPrecond

    label_dim = 1000
    kwargs = get_preset(args.preset).net_kwargs(label_dim)
    torch.manual_seed(0)
    ours = Precond(**kwargs)
    torch.manual_seed(0)
    theirs = RefPrecond(**kwargs)
    a, b = ours.state_dict(), theirs.state_dict()
    same = list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        for net in (ours, theirs):
            for q in net.parameters():
                if q.ndim == 0:
                    q.fill_(0.5)

    rows = []
    for batch in [int(s) for s in args.batches.split(",")]:
        x = torch.randn(batch, kwargs["img_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
        sigma = torch.rand(batch) * 5 + 0.1
        labels = torch.eye(label_dim)[torch.arange(batch) % label_dim]
        ours.eval(), theirs.eval()
        with torch.no_grad():
            diff = (ours(x, sigma, labels) - theirs(x, sigma, labels)).abs().max().item()
        for name, net in (("edm2", ours), ("reference", theirs)):
            def forward(net=net, x=x, sigma=sigma, labels=labels):
                net.eval()
                with torch.no_grad():
                    net(x, sigma, labels)

            def forward_backward(net=net, x=x, sigma=sigma, labels=labels):
                net.train()
                d, logvar = net(x, sigma, labels, return_logvar=True)
                (d.square().mean() + logvar.mean()).backward()
                net.zero_grad(set_to_none=True)

            rows.append((batch, name, best_time(forward, args.repeats) / batch,
                         best_time(forward_backward, args.repeats) / batch, diff))
            print(rows[-1], flush=True)

    machine = (f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {args.preset}, "
               f"best of {args.repeats}; identical initial state dicts: {same}")
    lines = [
        machine,
        "",
        "| batch | implementation | forward s/img | fwd+bwd s/img | max output difference |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.1e} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
