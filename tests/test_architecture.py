"""The package layers of docs/architecture.md, checked on the code: no import cycles, no upward imports.

Imports are read from the source (every ``import`` statement, also inside functions; the
``if TYPE_CHECKING:`` blocks are left out because they never run). A module may import
only from a lower layer or from its own unit (the same top-level module or subpackage).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medseg"

#: Layer of each unit (a top-level module or subpackage of medseg), lowest first;
#: the same table is drawn in docs/architecture.md.
LAYERS = [
    ["errors", "version", "_lazy"],
    ["records", "spatial", "topology", "device", "settings"],
    ["io", "metrics"],
    ["config", "data"],
    ["models", "losses"],
    ["model_folder"],
    ["inference"],
    ["training", "evaluation"],
    ["api", "demo"],
    ["commands", "__init__"],
    ["cli"],
    ["__main__"],
]
LAYER = {unit: n for n, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[str]:
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """medseg module -> the medseg modules it imports at run time."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = {t for t in _imports(ast.parse(path.read_text(encoding="utf-8"))) if t in paths}
        # importing a package that contains the module itself only runs that package's __init__
        graph[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return graph


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in import_graph()}
    assert units <= set(LAYER), f"add these to LAYERS and docs/architecture.md: {sorted(units - set(LAYER))}"


def test_no_module_imports_a_unit_above_or_beside_its_own():
    upward = [
        f"{a} -> {b}"
        for a, targets in import_graph().items()
        for b in targets
        if _unit(a) != _unit(b) and LAYER[_unit(b)] >= LAYER[_unit(a)]
    ]
    assert not upward, "imports against the layers (docs/architecture.md):\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("unit", ["data", "io", "metrics", "models", "losses"])
def test_library_layers_never_read_the_whole_config(unit):
    readers = [a for a, targets in import_graph().items() if _unit(a) == unit and "medseg.config" in targets]
    assert not readers, f"{readers} import medseg.config; take the settings section or plain arguments instead"
