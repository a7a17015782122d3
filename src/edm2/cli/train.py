"""`edm2 train`: a thin layer over `edm2.training.train(TrainConfig(...))`."""
from __future__ import annotations

HELP = "train an EDM2 model (re-running the same command resumes)"


def register(sub) -> None:
    p = sub.add_parser("train", help=HELP, description=HELP + ". Without --data it trains on the built-in "
                       "Fashion-MNIST. Sizes count images and accept Ki/Mi/Gi suffixes (128Ki = 131072). "
                       "Several GPUs or nodes: launch with torchrun. Documentation: the README section Training.")
    p.add_argument("--outdir", required=True, metavar="DIR", help="run folder (snapshots, checkpoints, logs)")
    p.add_argument("--data", metavar="PATH", help="dataset folder or zip (images or 8-channel latents); "
                   "default: the built-in Fashion-MNIST")
    p.add_argument("--preset", default="cpu-32", metavar="NAME", help="training preset (cpu-32, tiny, img512-xs, "
                   "img64-s, ...; the edm2- prefix is accepted; default cpu-32)")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--cond", dest="cond", action="store_true", default=None,
                   help="class-conditional (default: if the dataset has labels)")
    c.add_argument("--uncond", dest="cond", action="store_false", help="ignore the labels")
    p.add_argument("--xflip", action="store_true", help="x-flip augmentation")
    o = p.add_argument_group("overrides of the preset (default: the preset's value)")
    o.add_argument("--duration", metavar="N", help="training images in all")
    o.add_argument("--batch", metavar="N", help="global batch size")
    o.add_argument("--batch-gpu", metavar="N", help="micro-batch per process (gradient accumulation when smaller)")
    o.add_argument("--lr", type=float, metavar="X", help="reference learning rate")
    o.add_argument("--decay", type=float, metavar="N", help="learning-rate decay start, in batches (0: none)")
    o.add_argument("--channels", type=int, metavar="N", help="model channels")
    o.add_argument("--dropout", type=float, metavar="X", help="dropout probability")
    o.add_argument("--P-mean", dest="P_mean", type=float, metavar="X", help="mean of ln(sigma) in training")
    o.add_argument("--P-std", dest="P_std", type=float, metavar="X", help="std of ln(sigma) in training")
    o.add_argument("--ema-std", metavar="LIST", help="EMA widths sigma_rel, e.g. 0.05,0.10")
    o.add_argument("--status", metavar="N", help="status interval, images")
    o.add_argument("--snapshot", metavar="N", help="snapshot interval, images")
    o.add_argument("--checkpoint", metavar="N", help="checkpoint interval, images")
    s = p.add_argument_group("this invocation (may change when a run is resumed)")
    s.add_argument("--slice", metavar="N", help="train at most N images in this invocation, then checkpoint and stop")
    s.add_argument("--precision", default="fp16", choices=["fp32", "bf16", "fp16"], help="U-Net dtype on CUDA (default fp16, as the reference; the CPU computes in fp32)")
    s.add_argument("--compile", action="store_true", help="torch.compile the network")
    s.add_argument("--seed", type=int, default=0, help="random seed: initialisation, data order, noise (default 0)")
    s.add_argument("--init", metavar="SNAPSHOT", help="start from this network (snapshot, run folder or .pkl): fine-tuning")
    s.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")
    s.add_argument("--workers", type=int, metavar="N", help="data loader processes (default: 2 on CUDA, 0 on CPU)")
    s.add_argument("--grid", type=int, default=60, metavar="N", help="images in the sample grid at each snapshot "
                   "(conditional: 10 class rows; 0: none)")
    s.add_argument("--force-new", action="store_true", help="start over in an --outdir that holds another run "
                   "(its files move to DIR/previous-N/)")
    s.add_argument("-n", "--dry-run", action="store_true", help="print the resolved configuration and network size; "
                   "train nothing, write nothing")
    p.set_defaults(func=run)


def config_from_args(args):
    """argparse namespace -> TrainConfig (sizes parsed by edm2.units)."""
    from ..training import TrainConfig
    from ..units import parse_float_list, parse_nimg

    sizes = {}
    for name in ("duration", "batch", "batch_gpu", "status", "snapshot", "checkpoint", "slice"):
        value = getattr(args, name)
        sizes[name] = None if value is None else parse_nimg(value, "--" + name.replace("_", "-"))
    return TrainConfig(
        outdir=args.outdir, data=args.data, preset=args.preset, cond=args.cond, xflip=args.xflip, lr=args.lr,
        decay=args.decay, channels=args.channels, dropout=args.dropout, P_mean=args.P_mean, P_std=args.P_std,
        ema_std=None if args.ema_std is None else tuple(parse_float_list(args.ema_std, "--ema-std")),
        precision=args.precision, compile=args.compile, seed=args.seed, init=args.init, device=args.device,
        workers=args.workers, grid=args.grid, force_new=args.force_new, **sizes)


def run(args) -> int:
    from ..training import train

    result = train(config_from_args(args), dry_run=args.dry_run)
    if args.dry_run:
        print(result)
    return 0
