"""MkDocs hook: tables generated from the code at build time, so the pages
cannot drift from it.

In a page's Markdown,

    <!-- edm2:options train -->          the options of `edm2 train` (from its argparse parser)
    <!-- edm2:options dataset convert --> the same for a sub-command
    <!-- edm2:training-presets -->       the training presets of `edm2.presets.PRESETS`
    <!-- edm2:generation-presets -->     the published presets (`edm2 generate --list-presets`)

are replaced by Markdown tables. An unknown command is a build error.

A page that is only `--8<-- "FILE.md"` of a file at the repository root
(benchmarks.md includes BENCHMARKS.md) gets that file inlined here, with its
`docs/...` links (right on GitHub, from the root) made relative to docs/.

Pages in `OPTIONAL_PAGES` are added to the "Guides" section of the navigation
when they exist, so that mkdocs.yml need not change when one is written.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from edm2.cli import build_parser
from edm2.presets import PRESETS, format_generation_presets

# Guides written together with the features they describe: file -> navigation title.
OPTIONAL_PAGES = {
    "ablation.md": "Ablation ladder",
    "dynamics.md": "Training dynamics",
    "integrations.md": "Integrations",
    "reliability.md": "Reliability",
}

MARKER = re.compile(r"<!--\s*edm2:([a-z-]+)\s*([^>]*?)\s*-->")
ROOT_FILE = re.compile(r'^--8<-- "([A-Za-z_]+\.md)"\s*$')
REPO = Path(__file__).resolve().parents[1]


def _subparser(words: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            raise ValueError(f"edm2:options: no command 'edm2 {' '.join(words)}'")
        parser = subs[0].choices[word]
    return parser


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _option_name(action: argparse.Action) -> str:
    if not action.option_strings:  # positional
        return action.metavar or action.dest.upper()
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices
                                 else action.dest.upper())
    return f"{names} {metavar}"


def _help(action: argparse.Action, prog: str) -> str:
    if not action.help:
        return ""
    params = dict(vars(action), prog=prog)
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    params = {k: v for k, v in params.items() if v is not argparse.SUPPRESS}
    return action.help % params


def options_table(words: list[str]) -> str:
    """Markdown tables of a command's options, one per argument group."""
    parser = _subparser(words)
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = {"options": "Options", "positional arguments": "Arguments"}.get(group.title, group.title)
        out += [f"**{title[0].upper() + title[1:]}**", "", "| option | default | what |", "|---|---|---|"]
        for a in actions:
            if a.required:
                default = "required"
            elif a.default is None or a.default is False or a.default is argparse.SUPPRESS or a.nargs == 0:
                default = ""
            else:
                default = f"`{a.default}`"
            out.append(f"| `{_cell(_option_name(a))}` | {default} | {_cell(_help(a, parser.prog))} |")
        out.append("")
    return "\n".join(out)


def training_presets_table() -> str:
    def size(n: int) -> str:
        for unit, k in (("Gi", 2 ** 30), ("Mi", 2 ** 20), ("Ki", 2 ** 10)):
            if n >= k and n % k == 0:
                return f"{n // k}{unit}"
        return str(n)

    header = ["preset", "data", "channels", "channel_mult", "blocks", "lr", "decay (batches)", "dropout",
              "P_mean, P_std", "batch", "duration"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in PRESETS.values():
        data = f"{p.img_resolution}×{p.img_resolution}×{p.img_channels}"
        data += " latents" if p.latent else " pixels"
        mult = "×" + ",".join(map(str, p.channel_mult))
        lines.append(f"| `{p.name}` | {data} | {p.model_channels} | {mult} | {p.num_blocks} | {p.lr:g} | "
                     f"{p.decay:g} | {p.dropout:g} | {p.P_mean:g}, {p.P_std:g} | {p.batch} | {size(p.duration)} |")
    return "\n".join(lines)


def _replace(match: re.Match) -> str:
    kind, arg = match.group(1), match.group(2).split()
    if kind == "options":
        return options_table(arg)
    if kind == "training-presets":
        return training_presets_table()
    if kind == "generation-presets":
        return format_generation_presets(markdown=True)
    raise ValueError(f"unknown marker edm2:{kind}")


def on_page_markdown(markdown: str, page, config, files) -> str:
    included = ROOT_FILE.match(markdown.strip())
    if included:
        markdown = (REPO / included.group(1)).read_text().replace("](docs/", "](")
    return MARKER.sub(_replace, markdown)


def _nav_files(nav) -> set:
    found = set()
    for item in nav or []:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        found |= _nav_files(value) if isinstance(value, list) else {value}
    return found


def on_config(config):
    """Add the optional pages that exist to the "Guides" section of the navigation."""
    nav = config["nav"]
    listed = _nav_files(nav)
    guides = next(item["Guides"] for item in nav if isinstance(item, dict) and "Guides" in item)
    for name, title in OPTIONAL_PAGES.items():
        if name not in listed and (Path(config["docs_dir"]) / name).is_file():
            guides.append({title: name})
    return config
