"""Command line: `edm2 COMMAND ...` (also `python -m edm2`).

Every command is a thin layer over a documented Python function; each
sub-module here defines `register(subparsers)`, which adds its commands and
sets `func` to the handler.

Errors: the library's `EDM2Error`s name Python arguments (`lr=nan: ...`,
`` `at_nimg` ``); `flag_message` shows them with the command's flags
(`--lr nan: ...`, `--at-nimg`), as one line with exit status 2. An option's
`dest` is the name of the Python argument it feeds. The operating system's
refusals (disk full, permissions) are one line with exit status 1. Anything
else is a bug and keeps its traceback.

Ctrl-C (SIGINT) ends any command with one line, `edm2 COMMAND: interrupted;
rerun the same command to resume` (or `... rerun the same command` where
nothing resumes), and exit status 130 (128 + SIGINT, as shells report it).
Every file is written atomically and every lock is released on the way out,
so nothing half-written stays behind.
"""
from __future__ import annotations

import argparse
import re
import sys

from ..utils.distributed import resolve_device
from ..utils.errors import EDM2Error
from ..utils.fileio import describe_os_error
from ..utils.validate import UNSAFE_ADVICE, safe_error_text
from . import dataset, dynamics, export, flops, generate, import_official, ladder, metrics, phema, probe, toy, train

__all__ = ["main", "build_parser", "flag_message"]

# Commands that pick up where an interrupted run stopped when run again: training resumes from its
# newest checkpoint, generation skips the images already there, post-hoc EMA keeps finished outputs,
# encoding a dataset keeps the finished blocks.
_RESUMING = {"edm2 train", "edm2 generate", "edm2 phema", "edm2 dataset encode"}
EXIT_INTERRUPTED = 130  # 128 + SIGINT

_COMMAND_MODULES = [train, generate, phema, dataset, metrics, flops, import_official, export, toy, dynamics, probe,
                    ladder]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edm2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _COMMAND_MODULES:
        module.register(sub)
    _remember_leaf_parsers(parser)
    return parser


def _remember_leaf_parsers(parser: argparse.ArgumentParser) -> None:
    """Each command's own parser becomes a default of its namespace (`_parser`),
    so that errors can be shown with that command's flags. An option whose `dest`
    is a Python argument's name (`--steps` -> `num_steps`) keeps the flag's own
    metavar in the help (`--steps STEPS`)."""
    children = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not children:
        parser.set_defaults(_parser=parser)
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.nargs != 0 and action.metavar is None and action.choices is None:
            own = longs[0][2:].replace("-", "_")
            if action.dest != own:
                action.metavar = own.upper()
    for action in children:
        for child in set(action.choices.values()):
            _remember_leaf_parsers(child)


def _flags(parser: argparse.ArgumentParser) -> dict:
    """{dest: (on, off)}: the flag that sets a Python argument, and the flag that
    turns it off (store_false of the same dest), for every option of a command."""
    flags = {}
    for action in parser._actions:
        if action.dest in (argparse.SUPPRESS, "help") or isinstance(action, argparse._SubParsersAction):
            continue
        longs = [s for s in action.option_strings if s.startswith("--")] or action.option_strings
        on, off = flags.get(action.dest, (None, None))
        if not longs:  # positional: shown by its metavar
            on = on or (action.metavar or action.dest.upper())
        elif isinstance(action, argparse._StoreFalseAction):
            off = longs[0]
        else:
            on = on or longs[0]
        flags[action.dest] = (on, off)
    return flags


def flag_message(parser: argparse.ArgumentParser, message: str) -> str:
    """A library message with the command's flags for the Python arguments it
    names: 'lr=nan: ...' -> '--lr nan: ...', 'force_new=True' -> '--force-new',
    'resume=False' -> '--no-resume', '`at_nimg`' -> '--at-nimg'."""
    for dest, (on, off) in sorted(_flags(parser).items(), key=lambda kv: -len(kv[0])):
        name = re.escape(dest)
        if off:
            message = re.sub(rf"(?<![\w-]){name}=False\b", off, message)
        if on is None:
            continue
        message = re.sub(rf"(?<![\w-]){name}=True\b", on, message)
        message = re.sub(rf"`{name}`", on, message)
        if on.startswith("-"):
            message = re.sub(rf"(?<![\w./-]){name}=", on + " ", message)
        else:  # a positional argument: its value alone
            message = re.sub(rf"(?<![\w./-]){name}=", "", message)
    return message


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "device", None):  # every command's --device: refused before any work if missing here
            resolve_device(args.device)
        result = args.func(args)
    except EDM2Error as e:
        # What the user asked for cannot be done: one line naming the flag or file, and the fix.
        print(f"edm2 {args.command}: error: {flag_message(args._parser, _one_line(e))}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # The machine said no (disk full, read-only folder, permissions): one line naming the file.
        print(f"edm2 {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        # Ctrl-C: the user's wish, not an error. Temp files and locks were cleaned up on the way here.
        again = "rerun the same command to resume" if args._parser.prog in _RESUMING else "rerun the same command"
        print(f"edm2 {args.command}: interrupted; {again}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    if isinstance(result, int) and result:
        sys.exit(result)
    return 0


def _one_line(e: BaseException) -> str:
    """The error's message on one line (some libraries' messages span several)."""
    text = str(e)
    if any(advice in text for advice in UNSAFE_ADVICE):  # never pass on advice to load files unsafely
        return f"{type(e).__name__}: {safe_error_text(e)}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(e).__name__
