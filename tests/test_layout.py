"""The package's shape: no import cycle between the project's modules (imports inside functions
count too: a lazy import only hides a cycle), few loose top-level modules, no oversized module."""

from __future__ import annotations

import ast
from pathlib import Path

import unlearn

SRC = Path(unlearn.__file__).parent


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` that runs (at import or in a function), `if TYPE_CHECKING:` blocks
    aside: annotations never import anything at run time."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(c for c in ast.iter_child_nodes(node) if not _type_checking(c))


def _module_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports anywhere in its body, functions included}."""
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = ("unlearn", *path.relative_to(SRC).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in _runtime_nodes(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unlearn"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.append(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("unlearn")]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_imports():
    graph = _module_graph()
    assert "unlearn.runs.lifecycle" in graph["unlearn.recipes.skeleton"]
    assert "unlearn.methods.registry" in graph["unlearn.methods.lens"]
    assert "unlearn.search.plot" in graph["unlearn.search.outputs"]  # imported in a function
    assert "unlearn.search.outputs" not in graph["unlearn.search.plot"]  # TYPE_CHECKING only
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_project_modules():
    assert _cycles(_module_graph()) == []


LOOSE_MODULES_MAX = 8
MODULE_LINES_MAX = 500


def test_few_loose_modules_at_the_top_level():
    """The top level holds the entry point and what every package shares; the rest lives in
    packages that name the pipeline's stages."""
    loose = sorted(p.name for p in SRC.glob("*.py"))
    assert len(loose) <= LOOSE_MODULES_MAX, loose


def test_no_module_is_oversized():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MODULE_LINES_MAX} == {}


def test_step_cost_bench_covers_every_method(monkeypatch):
    """bench/step_cost.py measures every registered method: a new method must be
    added there, or the comparison table would lack its step cost."""
    import importlib.util

    from unlearn.methods import REGISTRY

    path = SRC.parents[1] / "bench" / "step_cost.py"
    monkeypatch.syspath_prepend(str(path.parent))  # it imports bench/interleave.py
    spec = importlib.util.spec_from_file_location("step_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert sorted(bench.METHODS) == sorted(REGISTRY)
