"""The shape of the tree: no import circles between the project's modules.

A circle means two modules that cannot be read (or loaded) one without the other; the
usual way it creeps in is an import moved into a function "to break" it, so imports
inside functions count here too. Imports under ``if TYPE_CHECKING:`` do not: they never
run.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "scheduler", "server", "shm", "sim", "bench", "tests")

# Circles another branch of the same renovation removes (the board's writers import the
# board for its layout; the board layout module ends that). An entry here that no longer
# matches a circle fails the test, so it is deleted when that branch lands.
ALLOWED_CYCLES: set[frozenset[str]] = set()


def module_files(repo: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((repo / package).rglob("*.py")):
            parts = list(path.relative_to(repo).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                getattr(node.test, "id", None) == "TYPE_CHECKING"
                or getattr(node.test, "attr", None) == "TYPE_CHECKING"):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in it, TYPE_CHECKING aside)."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skipped = _type_checking_nodes(tree)
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `from pkg.mod import name`
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_sees_a_circle_through_a_function_level_import(tmp_path):
    (tmp_path / "shm").mkdir()
    (tmp_path / "shm" / "a.py").write_text("from shm.b import f\n")
    (tmp_path / "shm" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from shm.c import C\n"
        "def f():\n    from shm import a\n")
    (tmp_path / "shm" / "c.py").write_text("import shm.b\n")
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
    graph = import_graph(module_files(tmp_path))
    assert graph["shm.b"] == {"shm.a"}  # the TYPE_CHECKING import is not an edge
    assert cycles(graph) == [frozenset({"shm.a", "shm.b"})]


def test_no_import_cycles():
    found = set(cycles(import_graph(module_files())))
    assert not found - ALLOWED_CYCLES, sorted(sorted(c) for c in found - ALLOWED_CYCLES)
    assert not ALLOWED_CYCLES - found, f"gone, delete from ALLOWED_CYCLES: {ALLOWED_CYCLES - found}"
