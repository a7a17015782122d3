"""`edm2 ladder`: thin layer over edm2.analysis.ladder.run_ladder."""
from __future__ import annotations

from ..analysis.ladder import LadderConfig, run_ladder
from ..sampling import SOLVERS
from ..utils.distributed import configure_threads
from ..utils.units import parse_nimg

HELP = "train the paper's ablation ladder (Table 1) in miniature, evaluate each rung at its best EMA length"


def register(sub) -> None:
    d = LadderConfig(outdir="")
    p = sub.add_parser("ladder", help=HELP, description=HELP + ", and write a table and figures. Rerunning "
                       "continues an interrupted ladder. Documentation: docs/ladder.md.")
    p.add_argument("--outdir", required=True, metavar="DIR", help="ladder folder: one run folder per config, "
                   "ladder.json/.csv/.md, figures")
    p.add_argument("--configs", default=",".join(d.configs), metavar="LIST",
                   help=f"configs of Table 1 to train, from A-G (default {','.join(d.configs)})")
    p.add_argument("--data", metavar="PATH", help="dataset folder or zip (default: the built-in Fashion-MNIST)")
    p.add_argument("--preset", default=d.preset, metavar="NAME", help=f"size preset of every rung "
                   f"(default {d.preset})")
    p.add_argument("--duration", metavar="N", help="training images per rung (default: the preset's)")
    p.add_argument("--snapshots", type=int, default=d.snapshots, metavar="K",
                   help=f"snapshots per rung, the post-hoc EMA's inputs (default {d.snapshots})")
    p.add_argument("--dynamics", metavar="N", help="images between training-dynamics measurements (default: "
                   "every snapshot)")
    p.add_argument("--dynamics-probe", type=int, default=d.dynamics_probe, metavar="N",
                   help=f"training items in the dynamics measurement batch (default {d.dynamics_probe})")
    p.add_argument("--grid", type=int, default=d.grid, metavar="N", help=f"sample-grid images at each snapshot "
                   f"(default {d.grid}: none)")
    p.add_argument("--std", dest="sigma_rels", default=",".join(f"{s:g}" for s in d.sigma_rels), metavar="LIST",
                   help="EMA lengths sigma_rel to reconstruct and evaluate, e.g. 0.05,0.1 or 0.05,0.10,...,0.25 "
                   f"(default {','.join(f'{s:g}' for s in d.sigma_rels)})")
    p.add_argument("--num", type=int, default=d.num, metavar="N", help=f"generated images per evaluation "
                   f"(default {d.num})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"sampler steps (default {d.steps})")
    p.add_argument("--solver", default=d.solver, choices=SOLVERS,
                   help=f"the sampler's ODE solver, as `edm2 generate --solver` (default {d.solver})")
    p.add_argument("--eval-seeds", type=int, default=d.eval_seeds, metavar="K",
                   help=f"disjoint seed sets per evaluation: the mean picks the best EMA length, the spread gives "
                        f"the lengths as good (default {d.eval_seeds})")
    p.add_argument("--metrics", default=",".join(d.metrics), metavar="LIST",
                   help=f"detectors of the Fréchet distance; the first picks the best EMA length "
                   f"(default {','.join(d.metrics)})")
    p.add_argument("--detector-dir", metavar="DIR", help="folder with the detector weights (default "
                   "$EDM2_DETECTOR_DIR or ~/.cache/edm2/detectors)")
    p.add_argument("--batch", dest="batch_size", type=int, default=d.batch_size, metavar="B",
                   help=f"images per generation batch (default {d.batch_size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"training and evaluation seed (default {d.seed})")
    p.add_argument("--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS if set, else up to 4)")
    p.set_defaults(func=run)


def run(args) -> None:
    cfg = LadderConfig(outdir=args.outdir, configs=args.configs, data=args.data, preset=args.preset,
                       duration=None if args.duration is None else parse_nimg(args.duration, "duration"),
                       snapshots=args.snapshots, dynamics_probe=args.dynamics_probe, grid=args.grid,
                       dynamics=None if args.dynamics is None else parse_nimg(args.dynamics, "dynamics"),
                       sigma_rels=args.sigma_rels, num=args.num, steps=args.steps, solver=args.solver,
                       eval_seeds=args.eval_seeds, metrics=args.metrics,
                       detector_dir=args.detector_dir, batch_size=args.batch_size, seed=args.seed, threads=args.threads)
    configure_threads(args.threads)
    run_ladder(cfg)
