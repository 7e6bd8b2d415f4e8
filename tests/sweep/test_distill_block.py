"""A sweep spec's `distill:` block: UNDO on each finished point's model, indexed with the point."""

from __future__ import annotations

import pytest

from unlearn.errors import UsageError
from unlearn.runs.store import Store
from unlearn.sweep.execute import run_sweep
from unlearn.sweep.spec import load_sweep
from unlearn.sweep.state import inspect_point

from .helpers import base_spec, write_spec


def test_distill_block_distils_each_point(tiny_world, tmp_path):
    spec = base_spec(tiny_world, grid={"retain_coef": [1]},
                     distill={"alpha": 0.2, "max_steps": 3, "pdbs": 4})  # fmt: skip
    sweep = load_sweep(write_spec(tmp_path, spec))
    (point,) = sweep.points
    assert point.distill is not None and point.distill.args.teacher == str(point.run_dir)
    assert inspect_point(point).distill == "pending"
    (state,) = run_sweep(sweep, log=lambda _: None)
    assert state.status == "done" and state.distill == "done" and state.finished
    with Store(sweep.store) as store:
        run = store.run(f"{point.id}-distill")
        assert run.kind == "unlearn" and run.method == "distill" and run.parent == point.id
        assert run.status == "done" and run.config["alpha"] == 0.2


@pytest.mark.parametrize(
    ("block", "needle"),
    [
        ({"alpha": 2.0}, "--alpha must be in [0, 1]"),
        ({"teacher": "x"}, "teacher set by the sweep itself"),
        ({"alpah": 0.1}, "alpah"),
    ],
)
def test_bad_distill_block(tiny_world, tmp_path, block, needle):
    spec = write_spec(tmp_path, base_spec(tiny_world, distill=block))
    with pytest.raises(UsageError) as e:
        load_sweep(spec)
    assert needle in str(e.value)
