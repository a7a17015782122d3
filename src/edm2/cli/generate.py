"""`edm2 generate`: a thin layer over `edm2.generate.generate_to_dir`."""
from __future__ import annotations

import argparse

from ..generate import check_class, compile_for_inference, generate_to_dir, load_nets
from ..nn import set_precision
from ..presets import apply_generation_preset, format_generation_presets
from ..sampling import SAMPLER_DEFAULTS, SOLVERS, check_guidance, check_solver_options
from ..utils.distributed import configure_threads, init_distributed, resolve_device, shutdown_distributed
from ..utils.errors import EDM2Error
from ..utils.units import parse_int_list
from ..utils.validate import check_sampler_options

HELP = "generate images (PNG per seed) with the EDM sampler (Heun, Euler or DPM-Solver++(2M)), optionally guided"


class _ListPresets(argparse.Action):
    """`--list-presets`: print the published generation presets and exit (needs no other option)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(format_generation_presets())
        parser.exit()


def register(sub) -> None:
    p = sub.add_parser("generate", help=HELP, description=HELP + ". Under torchrun the seeds are split over "
                       "the processes; images that already exist are skipped.")
    # --net is checked in the handler, so that other options (e.g. a published preset) can supply it.
    p.add_argument("--net", metavar="SNAPSHOT", help="snapshot file or run folder (latest, longest EMA)")
    p.add_argument("--gnet", metavar="SNAPSHOT", help="guiding network: unconditional (CFG) or weaker (autoguidance)")
    p.add_argument("--guidance", type=float, default=None, metavar="W", help="guidance weight w (default 1: none)")
    p.add_argument("--guidance-interval", metavar="LO,HI", help="guide only the steps whose noise level t is in "
                   "LO < t <= HI, e.g. 0.28,1.61 (default: every step; docs/sampling.md)")
    p.add_argument("--preset", metavar="NAME", help="a published model, e.g. edm2-img512-s-guid-dino: sets --net, "
                   "--gnet, --guidance, --guidance-interval where not given (files are downloaded once to the cache)")
    p.add_argument("--list-presets", action=_ListPresets, help="list the published presets (--preset NAME) and exit")
    p.add_argument("--outdir", required=True, metavar="DIR", help="folder for the PNGs")
    p.add_argument("--seeds", default="0-63", metavar="LIST", help="seeds, e.g. 0-49999 or 1,5,10-20 (default 0-63)")
    p.add_argument("--class", dest="class_idx", default="random", metavar="N|random",
                   help="class of every image for a conditional net (default: random per seed)")
    p.add_argument("--seeds-per-class", type=int, default=None, metavar="K",
                   help="instead of --class: seeds 0..K-1 get class 0, K..2K-1 class 1, ... (cycling through "
                   "the classes), and the grid gets one row per class, e.g. --seeds 0-99 --seeds-per-class 10")
    p.add_argument("--batch", dest="batch_size", type=int, default=32, metavar="B",
                   help="images per batch per process (default 32)")
    p.add_argument("--subdirs", action="store_true", help="put 1000 images per sub-folder (000000/, 001000/, ...)")
    p.add_argument("--grid", metavar="FILE.png", help="also write a grid of the first --grid-count images")
    p.add_argument("--grid-count", type=int, default=100, metavar="N", help="images in the grid (default 100)")
    # Each sampler option's dest is edm_sampler's keyword argument (`edm2.sampling.SAMPLER_DEFAULTS`).
    s = p.add_argument_group("sampler (EDM, paper App. D.1; docs/sampling.md)")
    s.add_argument("--solver", default="heun", choices=SOLVERS,
                   help="heun (2nd order, 2N-1 evaluations), euler (N), dpm++2m (2nd order, N) (default heun)")
    s.add_argument("--steps", dest="num_steps", type=int, default=32, help="sampler steps (default 32)")
    s.add_argument("--sigma-min", type=float, default=0.002, help="lowest noise level (default 0.002)")
    s.add_argument("--sigma-max", type=float, default=80.0, help="highest noise level (default 80)")
    s.add_argument("--rho", type=float, default=7.0, help="time step exponent (default 7)")
    s.add_argument("--S-churn", type=float, default=0.0, help="stochasticity (default 0: deterministic)")
    s.add_argument("--S-min", type=float, default=0.0, help="churn only at noise levels >= this")
    s.add_argument("--S-max", type=float, default=float("inf"), help="churn only at noise levels <= this")
    s.add_argument("--S-noise", type=float, default=1.0, help="churn noise scale (default 1)")
    e = p.add_argument_group("speed")
    e.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="U-Net dtype on CUDA (default: the snapshot's)")
    e.add_argument("--compile", action="store_true", help="torch.compile the networks (worth it for many images)")
    e.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")
    p.set_defaults(func=run)


def _class(text):
    if text is None or text == "random":
        return None
    try:
        return int(text)
    except ValueError:
        raise EDM2Error(f"--class {text!r}: expected a class index like 0 or 'random'") from None


def _checked_args(args) -> dict:
    """Everything that can be checked before loading anything (no file is written on error)."""
    # The authors' published (net, gnet, guidance) triple fills in what was not given.
    args.net, args.gnet, args.guidance, args.guidance_interval = apply_generation_preset(
        args.preset, args.net, args.gnet, args.guidance, args.guidance_interval)
    if not args.net:
        raise EDM2Error("--net is required: a snapshot file or a run folder")
    guidance = 1.0 if args.guidance is None else args.guidance
    check_guidance(guidance, args.gnet)
    seeds = parse_int_list(args.seeds, "seeds")
    if args.batch_size < 1:
        raise EDM2Error(f"--batch {args.batch_size}: must be >= 1")
    if args.grid_count < 1:
        raise EDM2Error(f"--grid-count {args.grid_count}: must be >= 1")
    if args.seeds_per_class is not None and args.seeds_per_class < 1:
        raise EDM2Error(f"seeds_per_class={args.seeds_per_class}: must be >= 1")
    if args.seeds_per_class is not None and _class(args.class_idx) is not None:
        raise EDM2Error(f"class_idx={args.class_idx} and seeds_per_class={args.seeds_per_class}: give one of them")
    sampler = check_sampler_options({name: getattr(args, name) for name in SAMPLER_DEFAULTS})
    sampler.update(check_solver_options(args.solver, args.guidance_interval, sampler["S_churn"], guidance))
    return dict(seeds=seeds, guidance=guidance, class_idx=_class(args.class_idx), sampler=sampler)


def run(args) -> int:
    opts = _checked_args(args)
    rank, world = init_distributed()
    configure_threads()
    try:
        device = resolve_device(args.device)  # refuses a device this machine lacks; cuda: cuda:LOCAL_RANK
        net, gnet, encoder, meta = load_nets(args.net, args.gnet, device)
        check_class(net, opts["class_idx"], args.seeds_per_class)
        nets = [m for m in (net, gnet) if m is not None]
        if args.precision:
            for m in nets:
                set_precision(m, args.precision)
        if args.compile:
            net, gnet = (compile_for_inference(m) if m is not None else None for m in (net, gnet))
        result = generate_to_dir(net, encoder, opts["seeds"], args.outdir, gnet=gnet, guidance=opts["guidance"],
                                 class_idx=opts["class_idx"], seeds_per_class=args.seeds_per_class,
                                 batch_size=args.batch_size, device=device,
                                 subdirs=args.subdirs, grid=args.grid, grid_count=args.grid_count,
                                 sources={"net": str(args.net), "gnet": args.gnet and str(args.gnet)},
                                 **opts["sampler"])
    finally:
        shutdown_distributed()
    if rank == 0:
        extra = f", grid {args.grid}" if args.grid else ""
        print(f"{args.outdir}: {len(opts['seeds']) - result['skipped']} images generated by {world} process(es), "
              f"{result['skipped']} already there{extra}")
    return 0

