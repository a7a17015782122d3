"""The package layout stays what CONTRIBUTING.md and docs/design.md describe:
every module is placed in CONTRIBUTING's layout table, the top level holds only
the few modules a user calls directly, public names are unique across modules,
and the test suite shares helpers through `tests/helpers` and
`tests/conftest.py` instead of path tricks or imports of other test modules.
"""
import ast
import re
from collections import defaultdict
from pathlib import Path

import edm2

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(edm2.__file__).parent
TESTS = ROOT / "tests"

# Suites about the project as a whole rather than one module.
PROJECT_SUITES = {"docs", "lint", "imports", "layout", "examples"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("edm2",) + path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _layout_table() -> str:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    start = text.index("## Layout")
    return text[start:text.index("\n## ", start + 1)]


def test_every_module_is_placed_in_the_contributing_layout_table():
    table = _layout_table()
    named = set(re.findall(r"`(edm2(?:\.\w+)*)`", table))
    rows = {line for line in table.splitlines() if line.startswith("|")}
    missing = []
    for module in _modules():
        if module in named:
            continue
        # A package row may list its modules by file name: | `edm2.ema` | `profiles`, `trackers` ... |
        package, _, leaf = module.rpartition(".")
        if any(f"`{package}`" in row and f"`{leaf}`" in row for row in rows):
            continue
        missing.append(module)
    assert not missing, f"modules missing from CONTRIBUTING.md's layout table: {missing}"
    unknown = sorted(n for n in named if n not in _modules() and not n.startswith("edm2.cli."))
    assert not unknown, f"CONTRIBUTING.md's layout table names modules that do not exist: {unknown}"


def test_top_level_holds_at_most_six_modules():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.name.startswith("__"))
    assert len(top) <= 6, f"top-level modules of edm2: {top}"


def _public_definitions(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node.name


def test_no_two_public_functions_share_a_name():
    """A name means one thing: no two modules define a public function or class of
    the same name. (Each `edm2.cli` module defines `register` and `run`, the
    protocol of a command module; they are left out.)"""
    where = defaultdict(list)
    for module, path in _modules().items():
        if module.startswith("edm2.cli"):
            continue
        for name in _public_definitions(path):
            where[name].append(module)
    clashes = {name: mods for name, mods in where.items() if len(mods) > 1}
    assert not clashes, f"public names defined in several modules: {clashes}"


def test_all_lists_only_names_the_module_has():
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                names = ast.literal_eval(node.value)
                mod = __import__(module, fromlist=["_"])
                absent = [n for n in names if not hasattr(mod, n)]
                assert not absent, f"{module}.__all__ names what it does not define: {absent}"
                assert len(names) == len(set(names)), f"{module}.__all__ repeats names"


def test_tests_share_helpers_without_path_tricks():
    offenders, path_trick = [], "sys.path." + "insert"   # spelled in two parts, so this file passes its own check
    for path in sorted(TESTS.rglob("*.py")):
        text = path.read_text()
        if path_trick in text:
            offenders.append(f"{path.name}: {path_trick}")
        if re.search(r"^\s*(from|import) test_\w+", text, flags=re.M):
            offenders.append(f"{path.name}: imports another test module")
    assert not offenders, offenders


def test_test_files_are_named_after_what_they_test():
    """tests/test_<area>[_<topic>].py: <area> is a module or subpackage of edm2
    (`test_ema_posthoc.py` tests `edm2.ema.posthoc`, `test_train_config.py`
    `edm2.train.config`), or the project as a whole (docs, lint, imports, layout,
    examples)."""
    modules = _modules()
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    wrong = []
    for path in sorted(TESTS.glob("test_*.py")):
        parts = path.stem.split("_")[1:]
        if parts[0] in PROJECT_SUITES:
            continue
        dotted = ["edm2." + ".".join(parts[:k]) for k in range(len(parts), 0, -1)]
        if not any(d in modules for d in dotted) and parts[0] not in leaves:
            wrong.append(path.name)
    assert not wrong, f"test files not named after an edm2 module: {wrong}"


def _documented_modules() -> list[str]:
    return re.findall(r"^::: (edm2[\w.]*)$", (ROOT / "docs" / "api.md").read_text(), flags=re.M)


def test_all_is_defined_exactly_by_the_documented_modules():
    """A module's `__all__` is its documented public surface: the modules that
    define one are those docs/api.md renders, and no others."""
    with_all = set()
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)
               for n in tree.body):
            with_all.add(module)
    documented = set(_documented_modules())
    assert with_all == documented, (f"__all__ without a docs/api.md entry: {sorted(with_all - documented)}; "
                                    f"documented without __all__: {sorted(documented - with_all)}")


def test_api_page_states_the_size_of_the_public_surface():
    count = sum(len(__import__(m, fromlist=["_"]).__all__) for m in _documented_modules())
    stated = re.search(r"(\d+) names in all", (ROOT / "docs" / "api.md").read_text())
    assert stated and int(stated.group(1)) == count, (stated and stated.group(1), count)
