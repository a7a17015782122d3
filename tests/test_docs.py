"""The documentation: the site builds with `mkdocs build --strict` (every
warning, including a broken link or anchor, fails it), and every repository
path or docs anchor that the docs, README, BENCHMARKS.md and the code cite
exists."""
import os
import re
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

# A repository path: src/..., tests/..., benchmarks/..., docs/..., .ci/... (no placeholders).
PATH = re.compile(r"(?<![\w./~-])((?:src|tests|benchmarks|docs|\.ci)/[\w./-]*[\w/])(#[\w-]+)?(?![\w<{*])")


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
                yield path, number, m.group(1), m.group(2)


def test_slugify_matches_mkdocs_rules():
    assert slugify("Power-function EMA") == "power-function-ema"
    assert slugify("`edm2 dataset convert`: images → dataset") == "edm2-dataset-convert-images-dataset"
    assert slugify("Per-seed randomness") == "per-seed-randomness"


def test_every_cited_repository_path_and_anchor_exists():
    missing, pending = [], optional_pages()
    assert "docs/dynamics.md" in pending
    for source, number, rel, anchor in cited(MARKDOWN + CODE):
        target = ROOT / rel
        if not target.exists() and rel in pending:
            continue
        if not target.exists():
            missing.append(f"{source.relative_to(ROOT)}:{number}: {rel} does not exist")
        elif anchor and target.suffix == ".md" and anchor[1:] not in anchors(target):
            missing.append(f"{source.relative_to(ROOT)}:{number}: {rel}{anchor}: no such heading")
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
    assert 'id="edm2.nn.Precond"' in api and 'id="edm2.phema.solve_posthoc_coefficients"' in api
