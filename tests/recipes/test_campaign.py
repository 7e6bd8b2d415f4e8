"""The campaign's choice of a method's best run: every retain task kept, then the lowest forget."""

from __future__ import annotations

import pytest

from unlearn.recipes.campaign import best_point, retain_floors
from unlearn.report.analysis import retain_aggregate
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RunDir
from unlearn.sweep.state import PointState

TARGET = {"retain": 0.99, "retain_late": 0.95, "near_domain": 0.90}


def state(pid: str, forget: float, status: str = "done", **retains) -> PointState:
    values = {t: retains.get(t, TARGET[t] - 0.01) for t in TARGET}
    return PointState(pid, status, forget=forget, retain=retain_aggregate(list(values.values())),
                      retains=values)  # fmt: skip


def test_floors_are_the_targets_accuracy_on_each_task_minus_the_margin(tmp_path):
    run = RunDir(tmp_path / "baseline-target")
    run.write_run(RunMeta("baseline-target", "baseline", status="done"))
    for task, acc in TARGET.items():
        run.append_eval(0, task, {"acc": acc})
    floors = retain_floors(run.path, ["retain", "retain_late", "near_domain", "other"], 0.05)
    assert floors == pytest.approx(
        {"retain": 0.94, "retain_late": 0.90, "near_domain": 0.85, "other": -0.05}
    )


def test_the_best_run_keeps_every_retain_task_not_just_the_minimum():
    """`late` has the lowest forget accuracy and a retain minimum (0.86) above the lowest floor
    (0.85), but it lost retain_late (0.86 < 0.90): a single floor on the aggregate would have
    picked it."""
    floors = {t: acc - 0.05 for t, acc in TARGET.items()}
    states = [
        state("late", 0.26, retain_late=0.86),
        state("near", 0.27, near_domain=0.80),
        state("failed-eval", 0.24, retain="failed"),
        state("missing", 0.24, near_domain=None),
        state("diverged", 0.20, status="diverged"),
        state("ok", 0.31),
        state("ok-but-worse", 0.33),
    ]
    assert best_point(states, floors).id == "ok"
    assert best_point(states[:5], floors) is None
    # Ties on forget go to the higher minimum over the retain tasks.
    tie = [state("a", 0.3, near_domain=0.86), state("b", 0.3, near_domain=0.88)]
    assert best_point(tie, floors).id == "b"
