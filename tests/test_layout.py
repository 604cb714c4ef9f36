"""The code's layout rules (docs/ARCHITECTURE.md, "Layers and data flow" and "Conventions"), read
from the source: imports flow one way, kernels never import models, files stay short."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "unimm"
MAX_LINES = 500


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: pathlib.Path, *, module_level: bool) -> set[str]:
    """The unimm modules ``name`` imports: at module level (including under ``if`` / ``try``),
    or anywhere (function bodies too). ``from package import submodule`` counts as the submodule;
    a module's own parent packages, which Python imports implicitly, do not count."""
    tree = ast.parse(path.read_text())
    if module_level:
        nodes = [sub for node in tree.body
                 for sub in (ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node])]
    else:
        nodes = list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {m for m in found if m in MODULES and m != name and not name.startswith(m + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, cycles = {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


@pytest.mark.parametrize("module_level", [True, False], ids=["module-level", "function-level-too"])
def test_imports_form_no_cycle(module_level):
    graph = {name: _imports(name, path, module_level=module_level) for name, path in MODULES.items()}
    assert _cycles(graph) == []


def test_kernels_never_import_models():
    offenders = {name: sorted(m for m in _imports(name, path, module_level=False) if m.startswith("unimm.models"))
                 for name, path in MODULES.items() if name.startswith("unimm.kernels")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_files_stay_short():
    """A file past the limit must say why in its module docstring ("longer than 500 lines")."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_LINES and f"longer than {MAX_LINES} lines" not in (
                ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{path.relative_to(PACKAGE.parent)}: {len(text.splitlines())} lines")
    assert long == []


def test_the_layout_rules_catch_a_cycle():
    """The cycle finder itself, on a graph with one cycle and one diamond (which is no cycle)."""
    graph = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set(), "x": {"y"}, "y": {"x"}}
    assert _cycles(graph) == [["x", "y", "x"]]
