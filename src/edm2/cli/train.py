"""`edm2 train`: a thin layer over `edm2.training.train(TrainConfig(...))`.

The options are made from TrainConfig's fields (their help, kind and group
live next to the field); errors of the library name the Python argument
(`lr=nan: ...`) and are shown here with the flag (`--lr nan: ...`).
"""
from __future__ import annotations

import dataclasses
import re

from ..trainconfig import TrainConfig
from ..units import parse_float_list, parse_nimg

HELP = "train an EDM2 model (re-running the same command resumes)"

_GROUPS = {"overrides": "overrides of the preset (default: the preset's value)",
           "session": "this invocation (may change when a run is resumed)"}
_TYPES = {"int": int, "float": float}


def _fields():
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", False)]


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field: rampup_Mimg -> --rampup-Mimg."""
    return "--" + name.replace("_", "-")


def register(sub) -> None:
    p = sub.add_parser("train", help=HELP, description=HELP + ". Without --data it trains on the built-in "
                       "Fashion-MNIST. Sizes count images and accept Ki/Mi/Gi suffixes (128Ki = 131072). "
                       "Several GPUs or nodes: launch with torchrun. Documentation: docs/training.md.")
    groups = {None: p}
    for key, title in _GROUPS.items():
        groups[key] = p.add_argument_group(title)
    for f in _fields():
        _add_option(groups.get(f.metadata["group"], p), f)
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
    """argparse namespace -> TrainConfig (sizes and lists parsed by edm2.units)."""
    values = {}
    for f in _fields():
        value = getattr(args, f.name)
        if value is not None and f.metadata["kind"] == "nimg":
            value = parse_nimg(value, f.name)
        elif value is not None and f.metadata["kind"] == "floats":
            value = tuple(parse_float_list(value, f.name))
        values[f.name] = value
    return TrainConfig(**values)


def cli_message(message: str) -> str:
    """A library message with the command-line flags for the Python arguments it
    names: 'lr=nan: ...' -> '--lr nan: ...', 'force_new=True' -> '--force-new'."""
    for f in _fields():
        on, off = flag(f.name), f.metadata["off_flag"]
        if off:
            message = re.sub(rf"(?<![\w-]){f.name}=False\b", off, message)
        if f.metadata["kind"] in ("flag", "tristate"):
            message = re.sub(rf"(?<![\w-]){f.name}=True\b", on, message)
        message = re.sub(rf"(?<![\w./-]){f.name}=", on + " ", message)
    return message


def run(args) -> int:
    from ..distributed import configure_threads
    from ..training import dry_run, train

    try:
        config = config_from_args(args)
        if args.dry_run:
            print(dry_run(config))
        else:
            configure_threads(config.threads)  # OMP_NUM_THREADS, else the cores shared, at most 4 a process
            train(config)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        raise _same_kind(e, cli_message(str(e))) from None
    return 0


def _same_kind(error: Exception, message: str) -> Exception:
    """An exception of error's type with another message (ValueError if that type wants more)."""
    try:
        return type(error)(message)
    except Exception:
        return ValueError(message)
