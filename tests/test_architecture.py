"""The package layout ARCHITECTURE.md describes: no module of cfic imports (directly or through others, lazily or
not) a module that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"cfic": "cfic", "decoding": "cfic.decoding", "retrieval": "cfic.retrieval", "api": "cfic.api",
            "eval": "cfic.eval"}


def module_files() -> dict[str, Path]:
    mods = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if "results" in parts:  # study scripts kept with their results are not part of the package
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            mods[name] = path
    return mods


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every import of a cfic module anywhere in a file (function-level imports count: they only hide a cycle)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph(module_files())
    assert "cfic.grounder" in graph and graph["cfic.grounder"]  # the graph was really read
    assert cycles(graph) == []


FRONT_ENDS = ("cfic.api", "cfic.cli", "cfic.eval", "cfic.benchmarks", "cfic.training", "cfic.batch")


def test_the_core_does_not_import_its_front_ends():
    """The pipeline and decoding never import the CLI, the REST service or the benchmarks (they import it)."""
    graph = import_graph(module_files())
    core = [m for m in graph if m.startswith("cfic.decoding") or m in ("cfic.grounder", "cfic.config", "cfic.prior")]
    for module in core:
        front = {t for t in graph[module] if t.startswith(FRONT_ENDS)}
        assert not front, f"{module} imports {sorted(front)}"
