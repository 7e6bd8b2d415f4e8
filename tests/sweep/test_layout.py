"""The sweep package's shape: modules import down one way (no cycle), each alone; project imports
at module top; submitit only when a job is submitted; no module much over 400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import unlearn

PACKAGE = Path(unlearn.__file__).parent / "sweep"
MODULES = ("spec", "inputs", "points", "state", "table", "execute", "workers", "slurm")


def _tree(name: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{name}.py").read_text())


def _sweep_imports(tree: ast.Module) -> set[str]:
    """The sibling modules a module imports at its top."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unlearn.sweep."):
            found.add(node.module.rsplit(".", 1)[1])
    return found


def test_the_modules_import_one_way():
    graph = {name: _sweep_imports(_tree(name)) for name in MODULES}
    order: list[str] = []
    while len(order) < len(graph):  # a topological order exists exactly when there is no cycle
        ready = [n for n in graph if n not in order and graph[n] <= set(order)]
        assert ready, f"import cycle among {sorted(set(graph) - set(order))}: {graph}"
        order += sorted(ready)
    assert graph["spec"] == {"inputs", "points"} and "slurm" not in set().union(*graph.values())


def test_the_package_imports_without_submitit():
    # A fresh interpreter (any `import unlearn.sweep.X` runs the package's __init__ first, which
    # imports every module but slurm; slurm imports the rest). submitit is heavy and optional:
    # only a submitted job imports it.
    code = "import sys, unlearn.sweep.slurm; print('submitit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", (*MODULES, "__init__"))
def test_project_imports_are_at_module_top_and_modules_stay_small(name):
    tree = _tree(name)
    local = [
        node.lineno
        for top in tree.body
        if isinstance(top, (ast.FunctionDef, ast.ClassDef))
        for node in ast.walk(top)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unlearn")
    ]
    assert local == [], f"{name}.py imports the project inside functions at lines {local}"
    # The "~400 lines": spec.py, the largest, is ~430 while it types values itself.
    assert len((PACKAGE / f"{name}.py").read_text().splitlines()) <= 450


def test_the_package_reexports_the_public_names():
    from unlearn import sweep
    from unlearn.sweep import execute, spec, state, table

    assert sweep.load_sweep is spec.load_sweep and sweep.run_sweep is execute.run_sweep
    assert sweep.inspect_point is state.inspect_point and sweep.format_table is table.format_table
    assert sweep.SlurmSettings is spec.SlurmSettings and sweep.MAX_POINTS == 1000
