"""The import structure of the production packages (DESIGN.md "Imports flow one way"): no module
imports one that imports it back, and the packages depend on each other in one direction only:
- launch (the driver, its data pipeline `launch.data`, benches and checks) may import the others;
- rollout_workers imports nothing of launch: workers receive prompts (token ids included), they
  never load them;
- learner imports nothing of rollout_workers, weight_sync or launch (it reads scored groups through
  the Protocols of `learner.groups`);
- weight_sync imports nothing of the other packages.
Besides: the reward scorers (`rollout_workers.rewards`) are pure functions, without processes or
tensors (the pool is `rollout_workers.reward_pool`), and loading the config does not import Ray.

    PYTHONPATH=$PWD python -m pytest -q tests/test_imports.py

The graph is read with `ast`, nothing is imported. For cycles, module-level imports count, those
under `if TYPE_CHECKING:` included (a cycle there is still a cycle in the design), imports inside a
function or method do not (they run at call time; the transport registry imports its links so).
For the direction between packages every import counts, a function's too: it crosses the
boundary all the same when it runs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("launch", "rollout_workers", "learner", "weight_sync")

# Package -> packages it may import. `launch` may import all of them.
ALLOWED = {
    "weight_sync": ("weight_sync",),
    "learner": ("learner",),
    "rollout_workers": ("rollout_workers",),
    "launch": PACKAGES,
}
PURE_SCORER_IMPORTS = {"__future__", "re", "fractions", "math_verify"}
"""Everything `rollout_workers.rewards` may import: the standard library's text and number
parsers and math-verify (no multiprocessing, signals or torch)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(tree: ast.Module, module: str, is_package: bool, in_functions: bool = False) -> set[str]:
    """Absolute names of the modules imported outside any function body (`in_functions`: inside
    them too)."""
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
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not in_functions:
                continue
            else:  # class bodies, if/try/with blocks (TYPE_CHECKING included) run at import time
                for field in ("body", "orelse", "finalbody"):
                    visit([n for n in getattr(node, field, []) if isinstance(n, ast.stmt)])
                for handler in getattr(node, "handlers", []):  # `except ImportError:` bodies
                    visit(handler.body)

    visit(tree.body)
    return found


def project_files() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(module: str, path: Path, in_functions: bool = False) -> set[str]:
    return module_level_imports(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py",
                                in_functions)


def import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    """Module -> the project modules it imports at module level (`in_functions`: anywhere);
    edges to unknown names dropped."""
    files = project_files()
    graph = {}
    for module, path in files.items():
        graph[module] = {name for name in imports_of(module, path, in_functions) if name in files and name != module}
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
    for module, imported in import_graph(in_functions=True).items():
        allowed = ALLOWED[module.split(".")[0]]
        bad += [f"{module} -> {name}" for name in sorted(imported)
                if not any(name == a or name.startswith(a + ".") for a in allowed)]
    assert not bad, "imports against DESIGN.md's direction:\n" + "\n".join(bad)


def test_function_local_imports_are_read():
    graph = import_graph(in_functions=True)
    # rollout_workers.worker imports its reward pool inside RolloutWorker.__init__.
    assert "rollout_workers.reward_pool" in graph["rollout_workers.worker"]
    assert "rollout_workers.reward_pool" not in import_graph()["rollout_workers.worker"]


def test_reward_scorers_are_pure():
    """The scorers import no process pool, signal, torch or project module (the pool imports them)."""
    imported = imports_of("rollout_workers.rewards", ROOT / "rollout_workers" / "rewards.py", in_functions=True)
    assert {name.split(".")[0] for name in imported} <= PURE_SCORER_IMPORTS


def test_loading_the_config_does_not_import_ray():
    """`launch.config` and every project module it imports at module level, transitively, import no
    Ray (config loading runs before any actor, in tools that have no cluster)."""
    files = project_files()
    seen, todo, outside = set(), ["launch.config"], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in imports_of(module, files[module]):
            if name in files:
                todo.append(name)
            elif name.split(".")[0] not in PACKAGES:
                outside.add(name.split(".")[0])
    assert "rollout_workers.config" in seen and "launch.data.config" in seen
    assert "ray" not in outside, sorted(m for m in seen if "ray" in {n.split(".")[0] for n in imports_of(m, files[m])})
