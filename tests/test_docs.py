"""The documentation: the site builds with `mkdocs build --strict` (every
warning, including a broken link or anchor, fails it), and every repository
path or docs anchor that the docs, README, BENCHMARKS.md and the code cite
exists."""
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKDOWN = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]
CODE = [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "tests").glob("*.py")),
        *sorted((ROOT / "benchmarks").glob("*.py"))]

# A repository path: src/..., tests/..., benchmarks/..., docs/..., .ci/... (no placeholders),
# with an optional #anchor (Markdown) or ::name (a function or class of a Python file).
PATH = re.compile(r"(?<![\w./~-])((?:src|tests|benchmarks|docs|\.ci)/[\w./-]*[\w/])(#[\w-]+)?(?:::(\w+))?(?![\w<{*])")


def optional_pages() -> set:
    """docs/hooks.py's OPTIONAL_PAGES: guides written with their features; citing one
    before it exists is allowed (once it exists, its anchors are checked)."""
    text = (DOCS / "hooks.py").read_text()
    block = re.search(r"OPTIONAL_PAGES = \{(.*?)\}", text, re.DOTALL).group(1)
    return {f"docs/{name}" for name in re.findall(r'"([\w-]+\.md)"', block)}


def slugify(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)           # links -> their text
    text = re.sub(r"[`*]", "", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set:
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            found.add(slugify(m.group(1)))
    return found


def cited(paths):
    for path in paths:
        fenced = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if path.suffix == ".md" and line.startswith("```"):
                fenced = not fenced
            for m in PATH.finditer(line):
                yield path, number, m.group(1), m.group(2), m.group(3)


def test_slugify_matches_mkdocs_rules():
    assert slugify("Power-function EMA") == "power-function-ema"
    assert slugify("`edm2 dataset convert`: images → dataset") == "edm2-dataset-convert-images-dataset"
    assert slugify("Per-seed randomness") == "per-seed-randomness"


def test_every_cited_repository_path_and_anchor_exists():
    """Paths, docs anchors and test names cited anywhere exist."""
    missing, pending = [], optional_pages()
    assert "docs/dynamics.md" in pending
    for source, number, rel, anchor, name in cited(MARKDOWN + CODE):
        target = ROOT / rel
        if not target.exists() and rel in pending:
            continue
        if not target.exists():
            missing.append(f"{source.relative_to(ROOT)}:{number}: {rel} does not exist")
        elif anchor and target.suffix == ".md" and anchor[1:] not in anchors(target):
            missing.append(f"{source.relative_to(ROOT)}:{number}: {rel}{anchor}: no such heading")
        elif name and not re.search(rf"^\s*(?:async def|def|class) {name}\b", target.read_text(), re.MULTILINE):
            missing.append(f"{source.relative_to(ROOT)}:{number}: {rel}::{name}: no such function or class")
    assert not missing, "\n".join(missing)


def test_top_level_pages_link_to_existing_files():
    """Relative Markdown links of README.md, CONTRIBUTING.md and BENCHMARKS.md (not
    part of the site, so `mkdocs build --strict` does not check them) name existing files
    (or a page of OPTIONAL_PAGES, as above)."""
    missing, pending = [], optional_pages()
    for page in (ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "BENCHMARKS.md"):
        fenced = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("```"):
                fenced = not fenced
            if fenced:
                continue
            prose = re.sub(r"`[^`]*`", "", line)   # examples in code spans are not links
            for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", prose):
                if not re.match(r"[a-z]+:", target) and not (ROOT / target).exists() and target not in pending:
                    missing.append(f"{page.name}:{number}: {target} does not exist")
    assert not missing, "\n".join(missing)


def test_docs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="the docs extra is not installed (pip install -e '.[docs]')")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    # The generated tables are in place: options from the parsers, presets from edm2.presets.
    training = (site / "training" / "index.html").read_text()
    assert "--outdir DIR" in training and "edm2:options" not in training
    published = (site / "published-models" / "index.html").read_text()
    assert "edm2-img512-xxl-autog-fid" in published and "edm2-img512-m-0268435-0.155" in published
    api = (site / "api" / "index.html").read_text()
    assert 'id="edm2.nn.Precond"' in api and 'id="edm2.ema.solve_posthoc_coefficients"' in api


def shell_commands(text: str, fenced_only: bool):
    """Commands of a Markdown text: lines of ```bash blocks (continuations joined) and,
    unless fenced_only, `inline code` spans that start with a command."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                yield line
    if not fenced_only:
        yield from re.findall(r"`((?:time |OMP_NUM_THREADS=\d+ )*(?:python|\.venv/bin/python|edm2) [^`]+)`", text)


def edm2_args(command: str):
    """The arguments after `edm2` (or `-m edm2 [--]`) of a shell command, else None."""
    words = shlex.split(command)
    if "edm2" not in words:
        return None
    args = words[words.index("edm2") + 1:]
    return args[1:] if args[:1] == ["--"] else args


def test_documented_edm2_commands_parse(capsys):
    """Every `edm2 ...` example of the README, the docs and BENCHMARKS.md is accepted
    by edm2's own parser (nothing runs)."""
    from edm2.cli import build_parser

    bad, count = [], 0
    for path in MARKDOWN:
        for command in shell_commands(path.read_text(), fenced_only=path.name != "BENCHMARKS.md"):
            args = edm2_args(command)
            if args is None:
                continue
            count += 1
            try:
                build_parser().parse_args(args)
            except SystemExit as e:  # --help / --list-presets exit with 0
                if e.code:
                    bad.append(f"{path.name}: {command}")
    capsys.readouterr()
    assert count >= 50, count
    assert not bad, "\n".join(bad)


def test_benchmark_commands_name_existing_scripts_and_their_options():
    """Every benchmark command (`python` + a script of the benchmarks folder) of BENCHMARKS.md and the docs names a
    script that exists and options that script defines."""
    checked, bad = 0, []
    for path in [ROOT / "BENCHMARKS.md", *sorted(DOCS.glob("*.md"))]:
        for command in shell_commands(path.read_text(), fenced_only=False):
            m = re.search(r"(?:^|\s)(benchmarks/\w+\.py)((?:\s+\S+)*)", command)
            if not m:
                continue
            checked += 1
            script = ROOT / m.group(1)
            if not script.is_file():
                bad.append(f"{path.name}: {command}: no {m.group(1)}")
                continue
            defined = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", script.read_text()))
            for option in re.findall(r"(?<!\S)(--[\w-]+)", m.group(2)):
                if option not in defined:
                    bad.append(f"{path.name}: {command}: {m.group(1)} has no option {option}")
    assert checked >= 10, checked
    assert not bad, "\n".join(bad)


def _markdown_table(text: str, first_header: str) -> list[dict]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_ablation_recipe_table_matches_the_recipes():
    """docs/ablation.md's recipe table is what `RECIPES` and the img512-s presets say."""
    from edm2.nn import CONFIGS
    from edm2.presets import RECIPES, get_preset

    rows = _markdown_table((DOCS / "ablation.md").read_text(), "config")
    assert [r["config"] for r in rows] == list(CONFIGS)
    for row in rows:
        c = row["config"]
        r, p = RECIPES[c], get_preset("img512-s", c)
        assert row["loss"].split()[0] == {"edm": "EDM", "uncertainty": "uncertainty"}[r.loss] == \
            {"edm": "EDM", "uncertainty": "uncertainty"}[p.loss], c
        assert float(row["Adam β2"]) == r.adam_beta2 == p.adam_beta2, c
        assert float(row["lr (α_ref)"]) == r.lr == p.lr, c
        schedule = f"inverse sqrt, t_ref {p.decay:g}" if r.lr_decay else "constant"
        assert row["LR schedule"] == schedule and (p.decay > 0) == r.lr_decay, c
        assert row["weight norm"] == r.weight_norm, c
        assert tuple(map(float, row["P_mean, P_std"].split(","))) == (p.P_mean, p.P_std), c
        assert r.P_mean is None or (r.P_mean, r.P_std) == (p.P_mean, p.P_std), c
        assert float(row["dropout"]) == p.dropout and (r.dropout is None or r.dropout == p.dropout), c
        assert float(row["loss scaling"]) == r.loss_scaling == p.loss_scaling, c
        if r.ema == "traditional":
            assert row["EMA"] == f"traditional, half-life {p.ema_halflife / 1e6:g}M images" and p.ema == r.ema, c
        else:
            assert row["EMA"] == f"power, best σ_rel {r.sigma_rel:.3f}" and p.ema == "power", c


def test_documented_python_imports_exist():
    """Every `from edm2... import ...` line of a Python example in the README and
    the docs names a module and names that exist (nothing else runs)."""
    import importlib

    bad, count = [], 0
    for path in MARKDOWN:
        for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.DOTALL):
            for m in re.finditer(r"^\s*from (edm2[\w.]*) import ([^\n#]+)", block, re.M):
                count += 1
                module = importlib.import_module(m.group(1))
                for name in (n.strip().split(" as ")[0] for n in m.group(2).strip("() ").split(",")):
                    if name and not hasattr(module, name):
                        bad.append(f"{path.name}: from {m.group(1)} import {name}")
    assert count >= 20, count
    assert not bad, "\n".join(bad)
