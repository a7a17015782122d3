"""`edm2 train`: a thin layer over `edm2.train.loop.train(TrainConfig(...))`.

The options are made from TrainConfig's fields (their help, kind, flag and
whether they may change on resume live next to the field); errors of the library name the Python argument
(`lr=nan: ...`) and `edm2.cli.flag_message` shows them with the flag
(`--lr nan: ...`).
"""
from __future__ import annotations

import dataclasses

from ..train.config import TrainConfig, may_change_on_resume
from ..utils.units import parse_float_list, parse_nimg

HELP = "train an EDM2 model (re-running the same command resumes)"

# The --help headings, by (may change on resume, default from the preset).
FIXED_NOTE = "a resume refuses a change"
RESUME_NOTE = "may change when a run is resumed"
HEADINGS = {(False, False): f"the run ({FIXED_NOTE})",
            (False, True): f"overrides of the preset (default: the preset's value; {FIXED_NOTE})",
            (True, True): f"overrides of the preset that {RESUME_NOTE} (default: the preset's value)",
            (True, False): f"this invocation ({RESUME_NOTE})"}
_TYPES = {"int": int, "float": float}


def _fields():
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", False)]


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field: rampup_Mimg -> --rampup-Mimg, sigma_rel -> --ema-std."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}.get(name)
    return (f is not None and f.metadata.get("flag")) or "--" + name.replace("_", "-")


def heading(f: dataclasses.Field) -> str | None:
    """The --help heading of a TrainConfig field."""
    return HEADINGS[may_change_on_resume(f), bool(f.metadata["preset"])]


def register(sub) -> None:
    p = sub.add_parser("train", help=HELP, description=HELP + ". Without --data it trains on the built-in "
                       "Fashion-MNIST. Sizes count images and accept Ki/Mi/Gi suffixes (128Ki = 131072). "
                       "Several GPUs or nodes: launch with torchrun. Documentation: docs/training.md.")
    groups = {title: p.add_argument_group(title) for title in HEADINGS.values()}
    for f in _fields():
        _add_option(groups[heading(f)], f)
    p.add_argument("-n", "--dry-run", action="store_true", help="print the resolved configuration and network "
                   "size; train nothing, write nothing")
    p.set_defaults(func=run)


def _add_option(group, f) -> None:
    m = f.metadata
    kind, default = m["kind"], f.default
    if kind == "flag":
        group.add_argument(flag(f.name), dest=f.name, action="store_true", help=m["help"])
    elif kind == "tristate":
        both = group.add_mutually_exclusive_group()
        both.add_argument(flag(f.name), dest=f.name, action="store_true", default=None, help=m["help"])
        both.add_argument(m["off_flag"], dest=f.name, action="store_false", help=f"not {flag(f.name)}")
    else:
        metavar = m["metavar"] or ("N" if kind in ("int", "nimg", "float") else None)
        group.add_argument(flag(f.name), dest=f.name, default=default, type=_TYPES.get(kind),
                           choices=m["choices"], metavar=None if m["choices"] else metavar,
                           required=default is dataclasses.MISSING, help=m["help"])


def config_from_args(args) -> TrainConfig:
    """argparse namespace -> TrainConfig (sizes and lists parsed by edm2.utils.units)."""
    values = {}
    for f in _fields():
        value = getattr(args, f.name)
        if value is not None and f.metadata["kind"] == "nimg":
            value = parse_nimg(value, f.name)
        elif value is not None and f.metadata["kind"] == "floats":
            value = tuple(parse_float_list(value, f.name))
        values[f.name] = value
    return TrainConfig(**values)


def run(args) -> int:
    from ..train.loop import dry_run, train
    from ..utils.distributed import configure_threads

    config = config_from_args(args)
    if args.dry_run:
        print(dry_run(config))
    else:
        configure_threads(config.threads)  # OMP_NUM_THREADS, else the cores shared, at most 4 a process
        train(config)
    return 0
