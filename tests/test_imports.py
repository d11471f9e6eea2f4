"""The import structure of the production packages (DESIGN.md "Imports flow one way"): no module
imports one that imports it back, and the packages depend on each other in one direction only.

    PYTHONPATH=$PWD python -m pytest -q tests/test_imports.py

The graph is read with `ast`, nothing is imported: module-level imports count, those under
`if TYPE_CHECKING:` included (a cycle there is still a cycle in the design), imports inside a
function or method do not (they run at call time; the transport registry imports its links so).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("launch", "rollout_workers", "learner", "weight_sync")

# Package -> packages (or modules) it may import. `launch` may import all of them.
ALLOWED = {
    "weight_sync": ("weight_sync",),
    "learner": ("learner", "rollout_workers.types"),
    "rollout_workers": ("rollout_workers",),
    "launch": PACKAGES,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Absolute names of the modules imported outside any function body."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                found.add(prefix)
                # `from pkg import mod` imports the submodule pkg.mod when there is one.
                found.update(f"{prefix}.{alias.name}" for alias in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            else:  # class bodies, if/try/with blocks (TYPE_CHECKING included) run at import time
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit([n for n in getattr(node, field, []) if isinstance(n, ast.stmt)])

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports at module level (edges to unknown names dropped)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for module, path in files.items():
        imported = module_level_imports(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
        graph[module] = {name for name in imported if name in files and name != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    graph = import_graph()
    assert "weight_sync.base" in graph["weight_sync.transports"]
    assert "launch.checkpoints" in graph["launch.train"]
    # Function-local imports are not edges: the registry imports its links lazily.
    assert "weight_sync.gloo_transport" not in graph["weight_sync.transports"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package: str):
    """Per package, so a failure names where to look; with `test_packages_import_one_way` (no two
    packages import each other: the allowed directions form no loop) this rules out cycles across
    packages too."""
    graph = import_graph()
    inside = {m: {n for n in graph[m] if n.split(".")[0] == package} for m in graph if m.split(".")[0] == package}
    assert find_cycle(inside) is None


def test_packages_import_one_way():
    bad = []
    for module, imported in import_graph().items():
        allowed = ALLOWED[module.split(".")[0]]
        bad += [f"{module} -> {name}" for name in sorted(imported)
                if not any(name == a or name.startswith(a + ".") for a in allowed)]
    assert not bad, "imports against DESIGN.md's direction:\n" + "\n".join(bad)
