"""`edm2 dynamics plot`: thin layer over edm2.analysis.dynamics.plot_dynamics / plot_loss_profile."""
from __future__ import annotations

from pathlib import Path

from ..analysis.dynamics import measure_snapshots, plot_dynamics, plot_loss_profile
from ..utils.distributed import configure_threads, resolve_device
from ..utils.errors import EDM2Error, ExistingFileError

HELP = "figures of the training dynamics recorded with `edm2 train --dynamics N`"


def register(sub) -> None:
    d = sub.add_parser("dynamics", help=HELP, description=HELP + " (paper Fig. 3 / Fig. 15). "
                       "Documentation: docs/dynamics.md.")
    cmds = d.add_subparsers(dest="dynamics_command", metavar="SUBCOMMAND")
    cmds.required = True
    p = cmds.add_parser("plot", help="activation/weight magnitudes per U-Net level over training, one column per "
                        "run; and loss per noise level with the learned u(sigma)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or dynamics.jsonl files), side by side")
    p.add_argument("--out", required=True, metavar="FILE.png", help="magnitude figure; the loss figure goes next to "
                   "it as FILE-loss.png")
    p.add_argument("--net", default="ema", choices=["ema", "raw"], help="which network's records (default: ema, "
                   "as the paper's Fig. 15)")
    p.add_argument("--labels", metavar="LIST", help="comma-separated column titles (default: the folder names)")
    p.add_argument("--sharey", action="store_true", help="one y scale per row across the runs")
    p.add_argument("--quantities", metavar="LIST", help="rows, from act_max, act_mean, weight_max, weight_mean, "
                   "update (default: all that were recorded)")
    p.add_argument("--overwrite", action="store_true", help="replace --out and FILE-loss.png if they exist")
    p.set_defaults(func=_plot)

    m = cmds.add_parser("measure", help="measure the stored EMA snapshots of a run (trained without --dynamics) "
                        "into RUN/dynamics-snapshots.jsonl, which `plot` then draws")
    m.add_argument("run", metavar="RUN", help="run folder")
    m.add_argument("--ema-std", dest="sigma_rel", type=float, help="which stored EMA (default: the longest)")
    m.add_argument("--data", metavar="PATH", help="dataset of the measurement batch (default: the run's)")
    m.add_argument("--probe", dest="probe_size", type=int, default=256, metavar="N",
                   help="items in the measurement batch (default 256, as `edm2 train --dynamics`)")
    m.add_argument("--out", metavar="FILE", help="output .jsonl (default RUN/dynamics-snapshots.jsonl; never one of "
                   "the run's own files)")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    m.set_defaults(func=_measure)


def _plot(args) -> None:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise EDM2Error(f"out={out}: give a .png file name")
    labels = None if args.labels is None else [s.strip() for s in args.labels.split(",")]
    if labels is not None and len(labels) != len(args.runs):
        raise EDM2Error(f"--labels: {len(labels)} names for {len(args.runs)} runs; give one per run")
    quantities = None if args.quantities is None else [s.strip() for s in args.quantities.split(",")]
    loss_out = out.with_name(out.stem + "-loss.png")
    for path in (out, loss_out):
        if path.is_dir() or (path.exists() and not args.overwrite):
            raise ExistingFileError(f"out={out}: {path} already exists; choose another name or pass overwrite=True")
    plot_dynamics(args.runs, out, net=args.net, quantities=quantities, labels=labels, sharey=args.sharey)
    plot_loss_profile(args.runs, loss_out, net=args.net, labels=labels)
    print(f"wrote {out} and {loss_out}")


def _measure(args) -> None:
    configure_threads()
    out = measure_snapshots(args.run, sigma_rel=args.sigma_rel, data=args.data, probe_size=args.probe_size,
                            out=args.out, device=str(resolve_device(args.device)), progress=True,
                            overwrite=args.overwrite)
    print(f"wrote {out}")
