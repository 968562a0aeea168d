"""No import cycle among the project's modules (issue 28).

The graph is built with ``ast`` over the source files of the four folders mapped into ``mobiflower``
(``platform``, ``clients``, ``strategies``, ``simulations``): one node per module, one edge per
``import`` of another project module.

Imports inside functions count too. They are how this project loads heavy libraries lazily (torch,
transformers, peft: a device process starts faster without them), not a way around a cycle: a
lazy cycle is still two modules that each need the other. Only imports under ``if TYPE_CHECKING:``
are left out, since they never run (annotations, with ``from __future__ import annotations``).
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {folder: f"mobiflower.{folder}" for folder in ("platform", "clients", "strategies", "simulations")}


def project_modules() -> dict[str, pathlib.Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import statement of a module, at any depth, except those under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                todo.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            todo.append(child)


def _imported(name: str, path: pathlib.Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement names (``from m import x`` names ``m`` and, if it is a module, ``m.x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    module = node.module or ""
    if node.level:  # relative: resolve against this module's package
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join(base + ([module] if module else []))
    return [module] + [f"{module}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            targets |= {m for m in _imported(name, path, node) if m in modules and m != name}
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_lazy_imports_and_skips_type_checking_ones():
    graph = import_graph()
    assert len(graph) > 100
    assert "mobiflower.platform.frames" in graph["mobiflower.platform.intake"]  # at module level
    assert "mobiflower.platform.tasks" in graph["mobiflower.platform.side_networks"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_projects_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
