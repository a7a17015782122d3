"""`edm2 flops`: parameter count and multiply-accumulates of a network."""
from __future__ import annotations

from ..analysis.flops import count_network, format_report


def register(sub):
    p = sub.add_parser("flops", help="parameters and multiply-accumulates per forward pass (batch 1)")
    p.add_argument("--preset", required=True, help="preset name, e.g. img512-s (edm2- prefix accepted)")
    p.add_argument("--resolution", type=int, default=None, help="image resolution (default: the preset's)")
    p.add_argument("--channels", type=int, default=None, help="image channels (default: the preset's)")
    p.add_argument("--label-dim", type=int, default=1000, help="number of classes, 0 = unconditional (default 1000)")
    p.add_argument("--config", default="G", metavar="X", help="config of the paper's ablation ladder, A-G "
                   "(default G; docs/ablation.md)")
    p.set_defaults(func=run)


def run(args):
    report = count_network(args.preset, resolution=args.resolution, channels=args.channels, label_dim=args.label_dim,
                           config=args.config)
    print(format_report(report))
