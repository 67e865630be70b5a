"""The package layout reads as the data flow: the import graph between llmctl's modules has no
circle, and no core module imports the command layer.

Every import counts, including those inside functions (the lazy imports that keep start-up fast)
and those only for type checking: a lazy import is still an arrow between two rooms.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llmctl

PACKAGE = Path(llmctl.__file__).parent
SHELL = ("llmctl.cli", "llmctl.__main__", "llmctl.options", "llmctl.commands")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The llmctl modules that ``path`` imports (``from llmctl.x import name`` counts as llmctl.x,
    or as llmctl.x.name when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "llmctl":
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        # a package's own __init__ is imported with any of its modules; it is not an arrow
        graph[name] = {m for m in _imports(path, modules) if m != name and not (name.startswith(m + ".") and files[m].name == "__init__.py")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_import_graph_has_no_circle() -> None:
    assert _cycles(import_graph()) == []


def test_the_core_never_imports_the_command_layer() -> None:
    arrows = [
        f"{module} -> {target}" for module, targets in import_graph().items() if not module.startswith(SHELL) for target in targets if target.startswith(SHELL)
    ]
    assert arrows == []


def test_the_cycle_finder_finds_a_circle() -> None:
    """The check above could not fail if the finder missed circles."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
