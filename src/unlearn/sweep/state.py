"""A sweep point's state, read from its run directories (reads only).

Design choices:
- Run directories are the truth (unlearn.runs.rundir): resume reads run.json. A run's status is
  what `runs.status.effective_status` says (a done run without eval rows is failed); this module
  has no status rules of its own, and an unreadable run directory counts as failed.
- A point is finished when its run is done, collapsed or diverged (results: a resumed sweep keeps
  them, a diverged run would diverge again) and its attack, if asked for and the run is done, is
  finished too.
- An attack whose recorded config differs from the spec's (the attack block was edited) is
  "stale" and re-run; the unlearning run needs no such check, its id hashes its config.
- Only a finished attack reports the forget accuracy after the attack: a running, preempted or
  failed one has part of its curve, whose last point is not that accuracy.
- "retain" is the minimum over the suite's retain tasks (`report.analysis.retain_aggregate`);
  each task's accuracy is kept beside it (`PointState.retains`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from unlearn.errors import UsageError
from unlearn.report.analysis import retain_aggregate
from unlearn.runs.rows import RunRecord
from unlearn.runs.rundir import RunDir
from unlearn.runs.status import effective_status
from unlearn.sweep.points import Point

FINISHED = ("done", "collapsed", "diverged")
"""Statuses that are results: a resumed sweep keeps them (a diverged run would diverge again)."""


@dataclasses.dataclass
class PointState:
    """What a point's run directories say about it."""

    id: str
    status: str
    """The unlearning run's status: pending (no run.json yet) or run.json's status; a done run
    without eval rows reads as failed (the store's invariant)."""
    attack: str | None = None
    """The attack's status (pending, a run status, or stale); None when none is asked for."""
    error: str | None = None
    forget: float | str | None = None
    """Final forget accuracy ("failed" for a failed eval, None when missing)."""
    retain: float | str | None = None
    """The minimum final accuracy over the retain tasks; a word or None when one of them has no
    number (`report.analysis.retain_aggregate`)."""
    retains: dict[str, float | str | None] = dataclasses.field(default_factory=dict)
    """Each retain task's final accuracy, in suite order (as `forget`)."""
    attacked_forget: float | str | None = None
    """Forget accuracy at the attack's last step (None until the attack has finished)."""
    seconds: float | None = None
    """Run (+ attack) wall time, from run.json's timestamps."""
    distill: str | None = None
    """The `distill:` block's run status (pending, a run status); None without the block."""
    robustness: str | None = None
    """The robustness suite's status (pending, a run status, or stale: another suite); None
    when the spec has no `robustness:` block."""
    worst_case: float | None = None
    """The suite's worst case on the held-out forget task, once it finished."""

    @property
    def finished(self) -> bool:
        if self.status not in FINISHED:
            return False
        if self.status != "done":
            return True
        return all(s is None or s in FINISHED for s in (self.attack, self.distill, self.robustness))


def _read_dir(path: Path | None) -> tuple[str, RunRecord | None, str | None]:
    """(status, record, error) of one run directory as readers must see it (a done run without
    eval rows is failed: `runs.status.effective_status`); unreadable counts as failed."""
    if path is None or not RunDir(path).exists():
        return "pending", None, None
    try:
        record = RunDir(path).read()
    except UsageError as e:
        return "failed", None, str(e)
    status, error = effective_status(record.meta.status, bool(record.evals))
    return status, record, error or record.meta.error


def _final_acc(record: RunRecord | None, task: str) -> float | str | None:
    if record is None:
        return None
    rows = [r for r in record.evals if r.task == task and r.metric == "acc"]
    if not rows:
        return None
    last = max(rows, key=lambda r: r.step)
    return "failed" if last.status == "failed" else last.value


def final_accs(run_dir: Path, tasks: list[str]) -> dict[str, float | str | None]:
    """Each task's final accuracy in a run directory, as `PointState` reads them ("failed" for
    a failed evaluation, None when missing)."""
    record = _read_dir(run_dir)[1]
    return {task: _final_acc(record, task) for task in tasks}


def _duration(record: RunRecord | None) -> float | None:
    return record.meta.wall_seconds() if record and record.meta else None


def _json_normal(d: dict) -> dict:
    return json.loads(json.dumps(d))


def inspect_point(point: Point) -> PointState:
    """The point's state from its run directories (reads only)."""
    status, run, error = _read_dir(point.run_dir)
    retains = {task: _final_acc(run, task) for task in point.retain_tasks}
    state = PointState(
        point.id,
        status,
        error=error,
        forget=_final_acc(run, point.forget_task),
        retain=retain_aggregate(list(retains.values())),
        retains=retains,
        seconds=_duration(run),
    )
    if point.robustness is not None:
        _inspect_robustness(point, state)
    if point.distill is not None:
        state.distill = _read_dir(point.distill_dir)[0]
    if point.attack_config is None:
        return state
    attack_status, attack, attack_error = _read_dir(point.attack_dir)
    if attack is not None:
        # The model path is left out: it moves with the out dir and the point id fixes it.
        # The suite's roles are recorded for reports; the suite fields themselves are compared.
        expected = _json_normal(point.attack_config.to_dict())
        recorded = dict(attack.meta.config)
        for key in ("model", "suite"):
            expected.pop(key, None)
            recorded.pop(key, None)
        # A field added since the attack ran (muon_lr, adam_lr) is missing from its record;
        # left at its default None it changes nothing, so it is no edit.
        recorded = {**{k: None for k in expected}, **recorded}
        if recorded != expected:
            attack_status = "stale"
    state.attack = attack_status
    if attack_status in FINISHED:
        # A running, preempted or failed attack has only part of its curve: its last point is
        # not the accuracy after the attack, so it is not reported as one.
        state.attacked_forget = _final_acc(attack, point.forget_task)
    state.error = state.error or attack_error
    if state.seconds is not None and _duration(attack) is not None:
        state.seconds += _duration(attack)
    return state


def _inspect_robustness(point: Point, state: PointState) -> None:
    status, record, error = _read_dir(point.robustness_dir)
    inputs = point.robustness.inputs
    # Another suite, or the same suite on another held-out task, corpus, seed...: stale.
    if record is not None and (
        record.meta.config.get("suite_key") != inputs.suite.key()
        or record.meta.config.get("inputs_key") != inputs.key()
    ):
        status = "stale"
    state.robustness = status
    if status in FINISHED and record is not None:
        heldout = record.meta.config.get("heldout_task")
        rows = [
            e
            for e in record.evals
            if e.task == heldout and e.metric == "worst_case" and e.status == "done"
        ]
        state.worst_case = rows[-1].value if rows else None
    state.error = state.error or error
