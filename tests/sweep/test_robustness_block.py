"""A sweep spec's `robustness:` block: the suite runs on each finished point's model, its state
and worst case show in the sweep's table, and a bad block is one line before anything runs."""

from __future__ import annotations

import pytest

from unlearn.errors import UsageError
from unlearn.runs.rundir import RunDir
from unlearn.runs.store import Store
from unlearn.sweep.execute import run_sweep
from unlearn.sweep.spec import load_sweep
from unlearn.sweep.state import inspect_point
from unlearn.sweep.table import describe_points, format_table

from .helpers import base_spec, write_spec

SUITE = {
    "attacks": [{"data": "forget", "steps": 2, "eval_every": 2, "pdbs": 4}],
    "probes": ["ablation"],
    "eval_limit": 12,
}


def test_robustness_block_runs_the_suite_on_each_point(tiny_world, tmp_path):
    spec = base_spec(tiny_world, grid={"retain_coef": [1]},
                     robustness={"suite": SUITE, "references": False})  # fmt: skip
    sweep = load_sweep(write_spec(tmp_path, spec))
    (point,) = sweep.points
    assert point.robustness is not None and "+ robustness custom" in describe_points(sweep)
    assert inspect_point(point).robustness == "pending"
    (state,) = run_sweep(sweep, log=lambda _: None)
    assert state.status == "done" and state.robustness == "done"
    assert isinstance(state.worst_case, float) and 0 <= state.worst_case <= 1
    assert "worst case" in format_table([state])
    # The summary's other rows on the held-out task (steps_to_half) are not its worst
    # case: a model whose attacks regain half the gap in 20 steps kept reading as 2000%.
    heldout = RunDir(point.robustness_dir).read_meta().config["heldout_task"]
    RunDir(point.robustness_dir).append_eval(0, heldout, {"steps_to_half": 20.0})
    assert inspect_point(point).worst_case == state.worst_case
    with Store(sweep.store) as store:
        run = store.run(f"{point.id}-robustness")
        assert run.kind == "robustness" and run.parent == point.id and run.status == "done"
        children = [r for r in store.runs() if r.parent == run.id]
        assert sorted(r.kind for r in children) == ["attack", "probe"]
    # Finished: a rerun does nothing; another suite makes the point's suite stale.
    assert run_sweep(load_sweep(write_spec(tmp_path, spec)), log=lambda _: None)[0].finished
    spec["robustness"]["suite"] = {**SUITE, "probes": ["in_context"]}
    (stale,) = load_sweep(write_spec(tmp_path, spec)).points
    assert inspect_point(stale).robustness == "stale"


@pytest.mark.parametrize(
    ("block", "needle"),
    [
        ("fastest", "unknown robustness suite 'fastest'"),
        ({"suite": "quick", "refs": True}, "unknown key(s) ['refs']"),
        ({"suite": {"attacks": [{"data": "forget", "lr": -1.0}]}}, "lr must be > 0"),
        (["quick"], "must be a suite name"),
    ],
)
def test_bad_robustness_block(tiny_world, tmp_path, block, needle):
    spec = write_spec(tmp_path, base_spec(tiny_world, robustness=block))
    with pytest.raises(UsageError) as e:
        load_sweep(spec)
    assert needle in str(e.value)
    assert not (tmp_path / "s").exists()
