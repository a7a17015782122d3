"""Command line: `edm2 COMMAND ...` (also `python -m edm2`).

Every command is a thin layer over a documented Python function; each
sub-module here defines `register(subparsers)`, which adds its commands and
sets `func` to the handler.
"""
from __future__ import annotations

import argparse
import sys

from ..fileio import describe_os_error
from ..validate import UNSAFE_ADVICE, safe_error_text
from . import dataset, dynamics, export, flops, generate, import_official, ladder, metrics, phema, probe, toy, train

_COMMAND_MODULES = [train, generate, phema, dataset, metrics, flops, import_official, export, toy, dynamics, probe,
                    ladder]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edm2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        # User errors: one line, non-zero exit. (Bugs with other types keep their traceback.)
        print(f"edm2 {args.command}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # The machine said no (disk full, read-only folder, permissions): one line naming the file.
        print(f"edm2 {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    if isinstance(result, int) and result:
        sys.exit(result)
    return 0


def _one_line(e: BaseException) -> str:
    """The error's message on one line (some libraries' messages span several)."""
    if isinstance(e, OSError) and not str(e).strip():
        return describe_os_error(e)
    text = str(e) if not isinstance(e, OSError) or e.strerror is None else describe_os_error(e)
    if any(advice in text for advice in UNSAFE_ADVICE):  # never pass on advice to load files unsafely
        return f"{type(e).__name__}: {safe_error_text(e)}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(e).__name__
