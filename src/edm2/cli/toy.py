"""`edm2 toy train|plot|score`: the 2D toy example (thin layer over edm2.toy)."""
from __future__ import annotations

from ..sampling import check_guidance
from ..toy import (
    ToyPanel,
    ToyTrainConfig,
    load_toy_run,
    plot_toy,
    sample_toy,
    toy_score,
    train_toy,
    tree_mixture,
    write_score_json,
)
from ..utils.distributed import configure_threads
from ..utils.errors import EDM2Error
from ..utils.units import parse_float_list


def register(sub):
    toy = sub.add_parser("toy", help="2D toy example: train, plot and score small models with exact ground truth")
    cmds = toy.add_subparsers(dest="toy_command", metavar="{train,plot,score}")
    cmds.required = True

    t = cmds.add_parser("train", help="train a toy model (edm2.toy.train_toy)")
    t.add_argument("--classes", default="A", choices=["A", "B", "AB"],
                   help="ground truth to learn (AB = unconditional)")
    t.add_argument("--layers", dest="num_layers", type=int, default=4, help="hidden layers (default 4)")
    t.add_argument("--dim", dest="hidden_dim", type=int, default=64, help="hidden features (default 64)")
    t.add_argument("--iters", type=int, default=4096, help="training iterations (default 4096)")
    t.add_argument("--batch", dest="batch_size", type=int, default=1024, help="points per iteration (default 1024)")
    t.add_argument("--ema", dest="sigma_rels", default="0.010,0.050,0.100",
                   help="tracked EMA sigma_rel list; the first is the default model")
    t.add_argument("--snapshot-every", dest="snapshot_iters", type=int, default=256,
                   help="iterations between snapshots (0 = only the last)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default; default 1)")
    t.add_argument("--outdir", required=True, help="new folder for the snapshots and training.json")
    t.set_defaults(func=_train)

    for name, helptext in (("plot", "sample, score and draw models over the ground truth (edm2.toy.plot_toy)"),
                           ("score", "sample and score a model against the ground truth (edm2.toy.toy_score)")):
        p = cmds.add_parser(name, help=helptext)
        p.add_argument("--net", required=True, help="toy snapshot file or run folder, or 'gt' for the exact denoiser")
        p.add_argument("--gnet", default=None, help="guiding model (snapshot file or run folder)")
        p.add_argument("--guidance", type=float, default=1.0, help="guidance weight w (needs --gnet unless 1)")
        p.add_argument("--ema-std", dest="sigma_rel", type=float, default=None,
                       help="EMA sigma_rel of --net inside a run folder; untracked values are reconstructed post hoc")
        p.add_argument("--classes", default=None, choices=["A", "B", "AB"],
                       help="ground truth to score against (default: the net's)")
        p.add_argument("--num", type=int, default=4096, help="samples (default 4096)")
        p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
        p.add_argument("--json", default=None, help="also write the score(s) to this JSON file")
        p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default; default 1)")
        if name == "plot":
            p.add_argument("--trajectories", type=int, default=0, help="draw the paths of this many samples")
            p.add_argument("--resolution", type=int, default=200, help="ground-truth contour grid (default 200)")
            p.add_argument("--out", required=True, help="output PNG")
        p.set_defaults(func=_plot if name == "plot" else _score)


def _train(args):
    config = ToyTrainConfig(classes=args.classes, num_layers=args.num_layers, hidden_dim=args.hidden_dim,
                            iters=args.iters, batch_size=args.batch_size,
                            sigma_rels=tuple(parse_float_list(args.sigma_rels, "sigma_rels")),
                            snapshot_iters=args.snapshot_iters, seed=args.seed, threads=args.threads)
    run = train_toy(config, outdir=args.outdir)
    print(f"trained {args.classes} layers={args.num_layers} dim={args.hidden_dim} for {args.iters} iterations "
          f"in {run.seconds:.1f} s, final loss {run.final_loss:.4f}; snapshots in {args.outdir}")


def _load(args):
    if args.threads > 0:  # small ops: extra threads only contend on a busy CPU
        configure_threads(args.threads)
    if args.num < 1:
        raise EDM2Error(f"--num={args.num}: must be >= 1")
    check_guidance(args.guidance, args.gnet)
    if args.net == "gt":
        classes = args.classes or "A"
        net = tree_mixture(classes)
    else:
        net, meta = load_toy_run(args.net, sigma_rel=args.sigma_rel)
        classes = args.classes or meta["classes"]
    gnet = load_toy_run(args.gnet)[0] if args.gnet is not None else None
    return net, gnet, classes


def _report(args, scores):
    for s in scores:
        print(f"{s['title']}: in_fraction {s['in_fraction']:.4f}  mean_logp {s['mean_logp']:.4f}  "
              f"(n={s['num']}, class {s['classes']})")
    if args.json:
        write_score_json(args.json, scores if len(scores) > 1 else scores[0])


def _title(args):
    return "samples" if args.gnet is None or args.guidance == 1 else f"guided, w={args.guidance:g}"


def _plot(args):
    net, gnet, classes = _load(args)
    panels = [ToyPanel("ground truth", None)] if args.net != "gt" else []
    panels.append(ToyPanel(_title(args) if args.net != "gt" else "ground-truth denoiser", net, gnet, args.guidance))
    scores = plot_toy(panels, args.out, classes=classes, num=args.num, seed=args.seed, trajectories=args.trajectories,
                      resolution=args.resolution)
    _report(args, scores)
    print(f"wrote {args.out}")


def _score(args):
    net, gnet, classes = _load(args)
    samples = sample_toy(net, args.num, seed=args.seed, gnet=gnet, guidance=args.guidance)
    _report(args, [dict(toy_score(samples, classes), title=_title(args), guidance=args.guidance)])

