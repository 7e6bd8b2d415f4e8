"""Searches on the tiny world with real runs: intermediate evaluations and pruning inside a
training run, a boundary search in two local worker processes, and one in a submitit job."""

from __future__ import annotations

import pytest
from helpers import spec, write

from unlearn.commands.search import main
from unlearn.errors import Pruned
from unlearn.recipes.unlearning import Monitor, build_run_config, run_unlearning
from unlearn.runs.rundir import RunDir
from unlearn.runs.store import Store
from unlearn.search.outputs import collect
from unlearn.search.spec import load_search
from unlearn.search.study import open_study

UNLEARNS = {"lr": {"log": [2e-3, 3e-3]}}
"""Two steps at these rates lower forget below the target's and keep the constraint (a trial
that unlearned nothing is never best)."""


def _config(tiny_world, tmp_path):
    return build_run_config(
        "sequential",
        {"world": str(tiny_world.root), "out": str(tmp_path / "run"), "max_steps": 4,
         "num_phases": 1, "pdbs": 2, "grad_accum": 1, "num_train_examples": 8,
         "store": str(tmp_path / "store.db"), "progress": False},
    )  # fmt: skip


@pytest.mark.parametrize("prune", [False, True])
def test_intermediate_evaluations_report_and_may_prune(tiny_world, tmp_path, prune):
    reports = []

    def report(part, accs):
        reports.append((part, sorted(accs)))
        if prune:
            raise Pruned("pruned by the test")

    meta = run_unlearning(_config(tiny_world, tmp_path), Monitor(2, report))
    evals = RunDir(tmp_path / "run").read().evals
    steps = sorted({e.step for e in evals})
    assert reports[0][0] == 1 and "forget" in reports[0][1] and "retain" in reports[0][1]
    if prune:
        # Stopped after the half-way evaluation: no final evaluation, status pruned (no result).
        assert meta.status == "pruned" and meta.error == "pruned by the test"
        assert steps == [2] and meta.model_path is None
        with Store(tmp_path / "store.db") as s:
            assert s.run(meta.id).status == "pruned"
    else:
        assert meta.status == "done" and steps == [2, 4]


def test_boundary_search_in_two_worker_processes(tiny_world, tmp_path):
    raw = spec(tiny_world, tmp_path, budget=2)
    raw["space"] = UNLEARNS
    path = write(tmp_path, raw)
    assert main([str(path), "--workers", "2"]) == 0
    search = load_search(path)
    result = collect(search, open_study(search, create=False))
    assert [t.status for t in result.trials] == ["done", "done"]
    assert len({t.run_id for t in result.trials}) == 2  # the workers drew different configs
    assert result.best is not None and result.best.feasible
    assert result.best.forget < result.baselines[0].forget
    assert (search.out / "best.yaml").exists()
    # Each run scored both parts of each task.
    evals = RunDir(search.trials_dir / result.best.run_id).read().evals
    assert {"forget#select", "forget#report", "near_domain#report"} <= {e.task for e in evals}


def test_boundary_search_as_a_submitit_job(tiny_world, tmp_path):
    raw = spec(tiny_world, tmp_path, budget=1)
    raw["space"] = UNLEARNS
    path = write(tmp_path, raw)
    assert main([str(path), "--executor", "submitit-local"]) == 0
    search = load_search(path)
    result = collect(search, open_study(search, create=False))
    assert [t.status for t in result.trials] == ["done"]
    assert any((search.out / "jobs").iterdir())  # the job's submitit folder


SUITE = {
    "attacks": [{"data": "forget", "steps": 2, "eval_every": 2, "pdbs": 4}],
    "probes": ["ablation"],
    "eval_limit": 12,
}


def test_pareto_search_runs_robustness_only_where_the_constraint_holds(tiny_world, tmp_path):
    raw = spec(tiny_world, tmp_path, goal="pareto", budget=3, sampler="random", max_forget=1.0)
    raw["space"] = {"lr": {"choice": [2.0e-3, 0.03]}}  # one unlearns a little, one breaks it
    raw["robustness"] = {"suite": SUITE, "cache": str(tmp_path / "references")}
    path = write(tmp_path, raw)
    main([str(path)])
    search = load_search(path)
    result = collect(search, open_study(search, create=False))
    done = [t for t in result.trials if t.status == "done"]
    assert {t.feasible for t in done} == {True, False}
    for t in done:  # the multi-fidelity rule: measured exactly where the constraint holds
        assert (t.worst_case is not None) == t.feasible
        assert (t.gap is not None) == t.feasible  # the twin's worst case, from the references
    assert result.front and all(t.feasible for t in result.front)
    assert result.best is not None and result.best.worst_case == min(
        t.worst_case for t in done if t.feasible
    )
    text = (search.out / "search.md").read_text()
    assert "## Pareto front" in text and "gap to twin" in text
    assert (search.out / "pareto.png").exists() and (search.out / "best.yaml").exists()
