"""`edm2 metrics ref|calc|gen` and `edm2 sweep`: thin layers over
`edm2.metrics` (reference_stats, calc_metrics, gen_metrics, sweep)."""
from __future__ import annotations

from pathlib import Path

from ..ema.posthoc import MAX_PROFILE_ERROR
from ..metrics import calc_metrics, gen_metrics, load_ref, reference_stats, sweep
from ..metrics.classifier import train_classifier
from ..metrics.evaluate import append_jsonl, check_ref_detectors, load_detectors, resolve_metrics
from ..metrics.sweep import (
    GROUPS_CSV,
    GROUPS_PNG,
    GUIDANCE_PNG,
    TIME_PNG,
    best_rows,
    check_eval_seeds,
    check_sweep_times,
    curve_optimum,
    row_metrics,
)
from ..presets import apply_generation_preset
from ..sampling import SOLVERS, check_guidance, check_solver_options
from ..utils.distributed import configure_threads, init_distributed, resolve_device, shutdown_distributed
from ..utils.errors import EDM2Error
from ..utils.units import parse_float_list, parse_int_list, parse_nimg
from ..utils.validate import check_sampler_options
from .phema import parse_max_profile_error

METRICS_HELP = ("comma-separated: fid, fd_dinov2, fd_classifier (default: ref: fid,fd_dinov2; calc/gen/sweep: "
                "those in --ref)")


def _common(p, ref=True, images=True, batch=64):
    if ref:
        p.add_argument("--ref", required=True, metavar="REF",
                       help="reference statistics: .npz from `edm2 metrics ref`, or the authors' .pkl (file or URL)")
    p.add_argument("--metrics", metavar="LIST", help=METRICS_HELP)
    if images:
        p.add_argument("--num", default="50000", metavar="N", help="number of images (default 50000, as the paper)")
    p.add_argument("--batch", dest="batch_size", type=int, default=batch, metavar="B",
                   help=f"images per batch per process (default {batch})")
    p.add_argument("--detector-dir", metavar="DIR",
                   help="folder with the detector weights (default $EDM2_DETECTOR_DIR or ~/.cache/edm2/detectors)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")


def register(sub) -> None:
    m = sub.add_parser("metrics", help="FID / FD_DINOv2: reference statistics, images, or a network",
                       description="Fréchet distances (paper App. D.4, A.5). Every command also runs under torchrun.")
    msub = m.add_subparsers(dest="metrics_command", metavar="COMMAND")
    msub.required = True

    p = msub.add_parser("ref", help="reference statistics (mean, covariance) of every image of a dataset")
    p.add_argument("--data", required=True, metavar="DATASET", help="image dataset: folder or zip of PNGs")
    p.add_argument("--dest", required=True, metavar="REF.npz", help="output file (never overwritten)")
    _common(p, ref=False, images=False)
    p.add_argument("--workers", type=int, default=2, help="data loading processes (default 2)")
    p.set_defaults(func=run_ref)

    p = msub.add_parser("calc", help="metrics of a folder or zip of images")
    p.add_argument("--images", required=True, metavar="DIR|ZIP", help="generated images (e.g. `edm2 generate` output)")
    _common(p)
    p.add_argument("--seed", default="0", metavar="LIST",
                   help="seed(s) of the random subset when there are more than --num images; "
                        "several (0,1,2) give one result each and their minimum (default 0)")
    p.add_argument("--workers", type=int, default=2, help="data loading processes (default 2)")
    p.add_argument("--jsonl", default="metrics.jsonl", metavar="FILE",
                   help="results are appended to this file (default metrics.jsonl)")
    p.set_defaults(func=run_calc)

    p = msub.add_parser("gen", help="generate images on the fly (optionally guided) and evaluate them")
    p.add_argument("--net", metavar="SNAPSHOT", help="snapshot file, run folder or authors' .pkl (file or URL)")
    p.add_argument("--gnet", metavar="SNAPSHOT",
                   help="guiding network (unconditional for CFG, weaker for autoguidance)")
    p.add_argument("--guidance", type=float, metavar="W", help="guidance weight (default 1: none)")
    p.add_argument("--preset", metavar="NAME", help="a published model, e.g. edm2-img512-s-guid-fid: sets --net, "
                   "--gnet and --guidance where not given")
    _common(p, batch=32)
    p.add_argument("--seed", default="0", metavar="LIST",
                   help="evaluation seed(s) k: images of seeds k*N ... (k+1)*N-1; 0,1,2 gives three results and "
                        "their minimum, as the paper reports (default 0)")
    p.add_argument("--steps", dest="num_steps", type=int, default=32, help="sampler steps (default 32)")
    p.add_argument("--solver", default="heun", choices=SOLVERS, help="sampler solver (default heun; docs/sampling.md)")
    p.add_argument("--guidance-interval", metavar="LO,HI",
                   help="guide only the steps whose noise level t is in LO < t <= HI (default: every step)")
    p.add_argument("--jsonl", default="metrics.jsonl", metavar="FILE",
                   help="results are appended to this file (default metrics.jsonl)")
    p.set_defaults(func=run_gen)

    p = msub.add_parser("classifier", help="train a small classifier on a labelled dataset: the detector of "
                        "fd_classifier and of class consistency (docs/metrics.md#a-classifier-of-your-own)")
    p.add_argument("--data", required=True, metavar="DATASET", help="labelled image dataset (folder or zip) of the "
                   "domain, held out from what the models train on")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="output .safetensors (never overwritten); put it in a detector folder as "
                        "classifier.safetensors")
    p.add_argument("--val", metavar="DATASET",
                   help="labelled dataset for the accuracy (default: 5%% held out of --data)")
    p.add_argument("--epochs", type=int, default=4, help="passes over --data (default 4)")
    p.add_argument("--batch", dest="batch_size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_classifier)

    p = sub.add_parser("sweep", help="post-hoc EMA sweep: reconstruct EMA lengths, evaluate, CSV + PNG",
                       description="Reconstruct each EMA length (and guidance weight) with post-hoc EMA, "
                                   "evaluate it, and write sweep.csv and sweep.png (paper Figure 5).")
    p.add_argument("--rundir", required=True, metavar="DIR", help="training run folder with its EMA snapshots")
    p.add_argument("--std", dest="sigma_rels", required=True, metavar="LIST",
                   help="EMA lengths: 0.05,0.1 or 0.010,0.015,...,0.250")
    p.add_argument("--at-nimg", metavar="LIST", help="training time(s) in images, e.g. 8Mi or 2Mi,4Mi,8Mi (default: "
                   "last snapshot); several also write sweep-time.png, the optimum over training time")
    p.add_argument("--outdir", metavar="DIR",
                   help="reconstructed snapshots, sweep.csv, sweep.png (default RUNDIR/sweep)")
    p.add_argument("--gnet", metavar="SNAPSHOT", help="guiding network for --guidance")
    p.add_argument("--guidance", default="1", metavar="LIST", help="guidance weight(s), e.g. 1,1.2,1.4 (default 1)")
    p.add_argument("--max-profile-error", metavar="E", type=parse_max_profile_error, default=MAX_PROFILE_ERROR,
                   help=f"refuse EMA lengths whose reconstructed profile has a larger relative L2 error "
                        f"(default {MAX_PROFILE_ERROR}; 'none': no check)")
    _common(p, batch=32)
    p.add_argument("--seed", type=int, default=0, help="evaluation seed k: seeds k*N ... (k+1)*N-1 (default 0)")
    p.add_argument("--eval-seeds", type=int, default=1, metavar="K",
                   help="evaluate every point with K disjoint seed sets (evaluation seeds SEED ... SEED+K-1); the "
                        "CSV holds their mean and spread (std), the figures a band (default 1)")
    p.add_argument("--groups", nargs="?", const="default", metavar="default|NAME=GLOB,...",
                   help="per-group sensitivity (paper Fig. 5b): vary one group of tensors' EMA length over --std, "
                        "the others at the base length; 'default' (encoder/decoder blocks per resolution, "
                        "attention, embedding, output) or NAME=glob pairs on tensor names; writes groups.csv, "
                        "groups.png")
    p.add_argument("--base-std", dest="base_std", type=float, metavar="S",
                   help="with --groups: the EMA length of the other tensors (default: the sweep's best)")
    p.add_argument("--steps", dest="num_steps", default="32", metavar="LIST",
                   help="sampler steps, e.g. 8,12,16,32 (default 32); several give the metric against network "
                        "evaluations")
    p.add_argument("--solver", default="heun", metavar="LIST",
                   help=f"sampler solver(s) of {', '.join(SOLVERS)}, e.g. heun,dpm++2m (default heun)")
    p.add_argument("--guidance-interval", metavar="LO,HI",
                   help="guide only the steps whose noise level t is in LO < t <= HI (default: every step)")
    p.set_defaults(func=run_sweep)


def _num(args):
    num = parse_nimg(args.num, "num")
    if num < 2:
        raise EDM2Error(f"num={num}: need at least 2 images (the paper uses 50000)")
    return num


def _start():
    """Join torchrun's process group (if any) and set the CPU threads -> (rank, world_size)."""
    rank_world = init_distributed()
    configure_threads()
    return rank_world


def _report(results: list, seeds: list, num: int, jsonl: str, source: dict, ref: str, rank: int) -> None:
    if rank != 0:
        return
    for seed, values in zip(seeds, results):
        print(f"seed {seed}  " + "  ".join(f"{m} {v:.4f}" for m, v in values.items()) + f"  ({num} images)")
        append_jsonl(jsonl, {**source, "ref": ref, "num": num, "seed": seed, "results": values})
    if len(results) > 1:
        print("min    " + "  ".join(f"{m} {min(r[m] for r in results):.4f}" for m in results[0]))
    print(f"appended to {jsonl}")


def run_ref(args) -> int:
    rank, world = _start()
    try:
        stats = reference_stats(args.data, args.dest, metrics=args.metrics or "fid,fd_dinov2",
                                batch_size=args.batch_size, workers=args.workers, detector_dir=args.detector_dir,
                                device=resolve_device(args.device))
    finally:
        shutdown_distributed()
    if rank == 0:
        for m, s in stats.items():
            print(f"{m}: {s.num} images, {s.dim}-d features")
        print(f"wrote {args.dest}")
    return 0


def run_calc(args) -> int:
    num, seeds = _num(args), parse_int_list(args.seed, "seed")
    ref = load_ref(args.ref)
    metrics = resolve_metrics(args.metrics, ref, args.ref)
    rank, world = _start()
    try:
        dets = load_detectors(metrics, args.detector_dir, resolve_device(args.device))
        check_ref_detectors(ref, dets, args.ref)
        results = [calc_metrics(args.images, ref, metrics, num=num, seed=s, batch_size=args.batch_size,
                                workers=args.workers, detector_dir=args.detector_dir,
                                device=resolve_device(args.device),
                                detectors=dets) for s in seeds]
    finally:
        shutdown_distributed()
    _report(results, seeds, num, args.jsonl, {"images": str(args.images)}, args.ref, rank)
    return 0


def run_gen(args) -> int:
    num, seeds = _num(args), parse_int_list(args.seed, "seed")
    check_sampler_options({"num_steps": args.num_steps})
    # The authors' published (net, gnet, guidance) triple fills in what was not given.
    args.net, args.gnet, args.guidance, args.guidance_interval = apply_generation_preset(
        args.preset, args.net, args.gnet, args.guidance, args.guidance_interval)
    if not args.net:
        raise EDM2Error("--net is required: a snapshot file, run folder or .pkl (or give --preset)")
    args.guidance = 1.0 if args.guidance is None else args.guidance
    check_guidance(args.guidance, args.gnet)
    solver_opts = check_solver_options(args.solver, args.guidance_interval, guidance=args.guidance)
    ref = load_ref(args.ref)
    metrics = resolve_metrics(args.metrics, ref, args.ref)
    rank, world = _start()
    try:
        dets = load_detectors(metrics, args.detector_dir, resolve_device(args.device))
        check_ref_detectors(ref, dets, args.ref)
        results = []
        for s in seeds:
            results.append(gen_metrics(args.net, ref, gnet=args.gnet, guidance=args.guidance, metrics=metrics,
                                       num=num, seed=s, batch_size=args.batch_size, detector_dir=args.detector_dir,
                                       device=resolve_device(args.device), detectors=dets,
                                       num_steps=args.num_steps, **solver_opts))
    finally:
        shutdown_distributed()
    source = {"net": str(args.net), "gnet": args.gnet and str(args.gnet), "guidance": args.guidance,
              "solver": args.solver, "num_steps": args.num_steps}
    if solver_opts["guidance_interval"] is not None:
        source["guidance_interval"] = list(solver_opts["guidance_interval"])
    _report(results, seeds, num, args.jsonl, source, args.ref, rank)
    return 0


def run_classifier(args) -> int:
    configure_threads()
    info = train_classifier(args.data, args.out, val=args.val, epochs=args.epochs, batch_size=args.batch_size,
                            seed=args.seed, overwrite=args.overwrite)
    print(f"accuracy {info['accuracy']:.4f} on {info['val_images']} held-out images; wrote {args.out}")
    return 0


def run_sweep(args) -> int:
    num = _num(args)
    sigma_rels = parse_float_list(args.sigma_rels, "sigma_rels")
    guidance = parse_float_list(args.guidance, "guidance")
    steps = parse_int_list(args.num_steps, "num_steps")
    for n in steps:
        check_sampler_options({"num_steps": n})
    solvers = list(dict.fromkeys(v.strip() for v in args.solver.split(",")))
    for solver in solvers:
        check_solver_options(solver, args.guidance_interval, guidance=1 if all(w == 1 for w in guidance) else None)
    at_nimg = None if args.at_nimg is None else check_sweep_times(args.at_nimg)
    check_eval_seeds(args.eval_seeds)
    rank, world = _start()
    try:
        rows = sweep(args.rundir, sigma_rels, args.ref, outdir=args.outdir, at_nimg=at_nimg, metrics=args.metrics,
                     num=num, seed=args.seed, gnet=args.gnet, guidance=guidance, batch_size=args.batch_size,
                     detector_dir=args.detector_dir, device=resolve_device(args.device), solvers=solvers,
                     steps=steps, guidance_interval=args.guidance_interval,
                     max_profile_error=args.max_profile_error, eval_seeds=args.eval_seeds, groups=args.groups,
                     base_std=args.base_std)
    finally:
        shutdown_distributed()
    if rank == 0:
        metrics = row_metrics(rows)
        times = sorted({r["nimg"] for r in rows})
        for t in times:
            at = [r for r in rows if r["nimg"] == t]
            for m, r in best_rows(at, metrics).items():
                o = curve_optimum(at, m)
                spread = f" ± {r[m + '_std']:.4f}" if r["seeds"] > 1 else ""
                print(f"best {m} {r[m]:.4f}{spread}: sigma_rel {r['ema_std']:.4f}, guidance {r['guidance']:g}, "
                      f"{r['solver']} {r['steps']} steps ({r['nfe']} evaluations)"
                      + (f" at nimg {t}" if len(times) > 1 else "")
                      + (f"; within one spread: sigma_rel {o['lo']:.4f}-{o['hi']:.4f}" if r["seeds"] > 1 else "")
                      + ("; at the edge of the swept lengths: widen --std" if o["edge"] else ""))
        outdir = Path(args.outdir) if args.outdir else Path(args.rundir) / "sweep"
        extra = [n for n, on in ((TIME_PNG, len(times) > 1), (GUIDANCE_PNG, (outdir / GUIDANCE_PNG).is_file()),
                                 (GROUPS_CSV, args.groups is not None), (GROUPS_PNG, args.groups is not None)) if on]
        print(f"wrote {outdir / 'sweep.csv'}, {outdir / 'sweep.png'}" + "".join(f", {n}" for n in extra))
    return 0
