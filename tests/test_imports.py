"""The package's import structure: every module imports, and the graph of
imports between edm2's modules has no cycle (neither at import time nor
counting the imports inside functions).

The graph is read from the source (ASTs), so a cycle is found even where
Python's import order happens to hide it. Check by hand with
`python -m pytest tests/test_imports.py -q`.
"""
import ast
import importlib
from pathlib import Path

import pytest

import edm2

PACKAGE_DIR = Path(edm2.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("edm2",) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _top_level_imports(tree: ast.Module):
    """Import statements run when the module is imported: at module level,
    including inside module-level if/try blocks, but not in functions or
    classes, and not under `if TYPE_CHECKING:`."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                stack.extend(handler.body)


def _targets(module: str, path: Path, node) -> set[str]:
    """edm2 modules a statement imports."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    submodules = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    # `from pkg import name` runs pkg's __init__ unless every name is a submodule
    # whose package is the importer's own (already being imported).
    if base in MODULES and (len(submodules) < len(node.names) or not module.startswith(base + ".")):
        submodules.add(base)
    return submodules | {parent for target in submodules for parent in _packages_run_first(target, module)}


def _packages_run_first(target: str, importer: str):
    """Importing a.b.c runs the __init__ of a and a.b first; those of the
    importer's own packages are already running."""
    parts = target.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if parent in MODULES and not importer.startswith(parent + "."):
            yield parent


def import_graph(everywhere: bool = False) -> dict[str, set[str]]:
    """{module: edm2 modules it imports at import time} (with `everywhere`,
    counting the import statements inside functions too)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))) if everywhere \
            else _top_level_imports(tree)
        graph[module] = set()
        for node in nodes:
            graph[module] |= _targets(module, path, node) - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_relative_imports():
    graph = import_graph()
    assert "edm2.io.snapshot" in graph["edm2.io.loading"] and "edm2.io.official" in graph["edm2.io.loading"]
    assert "edm2.nn.layers" in graph["edm2.nn.unet"]
    assert "edm2.utils.distributed" in graph["edm2.generate"]


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_through_imports_inside_functions_either():
    """An import inside a function hides a cycle from Python, not from the design."""
    cycle = find_cycle(import_graph(everywhere=True))
    assert cycle is None, "import cycle (counting imports inside functions): " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)


# The layers of docs/design.md#code-map: a package on the left imports none on the right.
FORBIDDEN = {
    "utils": {"nn", "ema", "io", "data", "train", "generate", "metrics", "analysis", "toy", "cli", "presets", "loss",
              "sampling", "encoders"},
    "nn": {"ema", "io", "data", "train", "generate", "metrics", "analysis", "toy", "cli", "presets", "loss",
           "sampling", "encoders"},
}
for _low in ("ema", "data", "sampling", "loss", "presets", "encoders"):
    FORBIDDEN[_low] = {"train", "generate", "metrics", "analysis", "toy", "cli"}


def test_lower_layers_do_not_import_higher_ones():
    def package(module):
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else ""

    wrong = sorted(f"{a} -> {b}" for a, targets in import_graph(everywhere=True).items() for b in targets
                   if package(b) in FORBIDDEN.get(package(a), ()))
    assert not wrong, wrong
