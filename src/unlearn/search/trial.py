"""One trial of a search: sample a config, run it as a normal run, tell Optuna what it found.

Design choices:
- A trial is a sweep point (`Search.point`): its run directory under OUT/trials, indexed in
  the store, status words and tables as any run. The Optuna trial holds the numbers and the
  run's id; the run directory holds the run.
- Only a finished run with every number is a result (`TrialState.COMPLETE`). A pruned run is
  told PRUNED, a failed, diverged or collapsed one FAIL (its status and error kept as user
  attributes): neither is ever a value the sampler or a table reads as a result.
- A stop signal ends the trial's run "preempted" (checkpointed): the trial is failed as
  interrupted and its parameters queued again, so the rerun resumes that run.
- Everything the search decides on (pruning, the constraint, the objectives) reads the
  selection part of each task (`Search.selection`); the report part's numbers are kept beside
  them (the `report` attribute) for the outputs, never shown to the sampler or the pruner.
- The constraint holds when every retain task is at least reference - delta, compared with a
  tolerance of TOLERANCE: a retain accuracy exactly on its floor (0.7 against 0.8 - 0.1,
  which floats compute as 0.7000000000000001) satisfies it.
- The pruner sees forget accuracy plus the retain shortfall below the constraint (0 when
  satisfied): a trial that unlearns by breaking the model must not look promising.
- The multi-fidelity rule of a three-objective pareto search: the robustness suite runs only on
  a trial that satisfies the retain constraint; the others get the worst possible worst case
  (1.0, never shown as a measurement: `worst_case_measured` is false) and are infeasible.
- Two trials may sample one configuration (a choice or int space, or TPE converging): they
  share its run directory, so a trial holds a lock on it while it runs; the second waits and
  then reads the finished run's result instead of training it again.
- Overhead is timed: everything a trial spends outside its runs (asking, sampling, telling,
  bookkeeping), appended with the trial's time to OUT/timing.jsonl.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearn.errors import Pruned, UsageError
from unlearn.recipes.unlearning import Monitor
from unlearn.runs.store import Store
from unlearn.search.space import study_name
from unlearn.search.spec import Search
from unlearn.search.study import CONSTRAINT, INTERRUPTED, reference_values
from unlearn.sweep.execute import run_point
from unlearn.sweep.points import Point
from unlearn.sweep.state import PointState, final_accs

if TYPE_CHECKING:
    import optuna

WORST = 1.0
"""The worst case given to a pareto trial whose robustness was not measured (infeasible)."""
TOLERANCE = 1e-9
"""Accuracies closer than this are equal (the constraint's floor, the target's forget)."""


def margin(retains: dict[str, float], reference: dict[str, float], delta: float) -> float:
    """How far the weakest retain task is above its floor, reference - delta (< 0: below)."""
    return min(retains[t] - (reference[t] - delta) for t in reference)


def satisfied(margin_: float) -> bool:
    """Whether a margin satisfies the constraint (at or above the floor, within TOLERANCE)."""
    return margin_ >= -TOLERANCE


def constraint_value(margin_: float) -> float:
    """The constraint Optuna reads (<= 0: satisfied): the shortfall, 0 within the tolerance."""
    return min(-margin_, 0.0) if satisfied(margin_) else -margin_


def pruning_value(
    forget: float, retains: dict[str, float], reference: dict[str, float], delta: float
) -> float:
    """What the pruner compares: forget accuracy plus the retain shortfall below the floor."""
    return forget + max(0.0, -margin(retains, reference, delta))


def sample(trial: optuna.Trial, search: Search) -> tuple[str, dict[str, Any]]:
    """The trial's method and the values of its space (define-by-run: the method first)."""
    methods = [b.method for b in search.blocks]
    method = trial.suggest_categorical("method", methods) if search.several else methods[0]
    block = search.block(method)
    values = {p.field: p.suggest(trial, study_name(method, p.field, search.several))
              for p in block.params}  # fmt: skip
    return method, values


def _monitor(trial: optuna.Trial, search: Search, reference: dict) -> Monitor:
    def report(part: int, accs: dict[str, float | None]) -> None:
        forget = accs.get(search.selection(search.forget_task))
        retains = {t: accs.get(search.selection(t)) for t in search.retain_tasks}
        if forget is None or any(v is None for v in retains.values()):
            return  # a failed intermediate evaluation: no value, no pruning decision
        trial.report(pruning_value(forget, retains, reference, search.delta), part)  # type: ignore[arg-type]
        if trial.should_prune():
            raise Pruned(f"pruned by the {search.pruner} pruner after part {part}"
                         f" of {search.intermediate}")  # fmt: skip

    return Monitor(search.intermediate, report)


def run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    search: Search,
    log: Callable[[str], None] = print,
    asked_s: float = 0.0,
) -> str:
    """Run one asked trial to its end and tell the study; returns the outcome word (done,
    pruned, failed, interrupted). `asked_s`: the time `ask` took (overhead)."""
    from optuna.trial import TrialState

    start = time.perf_counter()
    reference = reference_values(study)
    try:
        method, values = sample(trial, search)
        point = search.point(method, values)
    except UsageError as e:  # a combination of values no config accepts: a failed trial
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.FAIL)
        log(f"[trial {trial.number}] failed: {e}")
        return "failed"
    for key, value in (("run_id", point.id), ("run_dir", str(point.run_dir)),
                       ("method", method), ("config", values)):  # fmt: skip
        trial.set_user_attr(key, value)
    shown = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in values.items())  # fmt: skip
    log(f"[trial {trial.number}] {method} {shown}: starting ({point.id})")
    monitor = _monitor(trial, search, reference) if search.pruner != "none" else None
    overhead = asked_s + time.perf_counter() - start

    ran = time.perf_counter()
    with _claimed(search.out / ".locks", point):
        state = run_point(point, monitor)
        attrs: dict[str, Any] = {"status": state.status}
        if state.error:
            attrs["error"] = state.error
        values_out: list[float] | None = None
        outcome = state.status
        if state.status == "preempted":
            outcome = "interrupted"
        elif state.status == "done":
            values_out, attrs, outcome = _result(point, state, search, reference, attrs)
    seconds = time.perf_counter() - ran

    told = time.perf_counter()
    _ingest(search.store, point)
    attrs["seconds"] = round(seconds, 2)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    if outcome == "interrupted":
        trial.set_user_attr(INTERRUPTED, True)
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
    elif outcome == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    elif values_out is None:
        study.tell(trial, state=TrialState.FAIL)
    else:
        if search.goal == "boundary" or search.robustness is not None:
            trial.set_constraint(CONSTRAINT, attrs["constraint"])
        study.tell(trial, values_out)
    overhead += time.perf_counter() - told
    _timing(search.out, trial.number, seconds, overhead)
    log(f"[trial {trial.number}] {outcome}{_summary(attrs)} ({seconds:.0f} s)")
    return outcome


def _result(
    point: Point, state: PointState, search: Search, reference: dict, attrs: dict[str, Any]
) -> tuple[list[float] | None, dict[str, Any], str]:
    """The objective values of a finished run (None when a number is missing) and its attrs:
    the selection part's numbers, and the report part's under `report`."""
    forget = state.forget  # the run's first forget task is its selection part
    retains = {t: state.retains.get(search.selection(t)) for t in search.retain_tasks}
    report_forget = search.report(search.forget_task)
    report = {
        "forget": final_accs(point.run_dir, [report_forget])[report_forget],
        "retains": {t: state.retains.get(search.report(t)) for t in search.retain_tasks},
    }
    numbers = [forget, *retains.values(), report["forget"], *report["retains"].values()]
    if not all(isinstance(v, float) for v in numbers):
        attrs.update(status="failed", error=state.error or "an evaluation has no number")
        return None, attrs, "failed"
    m = margin(retains, reference, search.delta)  # type: ignore[arg-type]
    retain = min(retains.values())  # type: ignore[type-var]
    attrs.update(forget=forget, retains=retains, retain=retain, margin=m,
                 constraint=constraint_value(m), report=report)  # fmt: skip
    if search.goal == "boundary":
        return [forget], attrs, "done"  # type: ignore[list-item]
    values = [forget, retain]
    if search.robustness is None:
        return values, attrs, "done"  # type: ignore[return-value]
    attrs["worst_case_measured"] = False
    if not satisfied(m):
        return [*values, WORST], attrs, "done"  # type: ignore[return-value]
    point.robustness = search.robustness
    state = run_point(point)
    if state.robustness != "done" or state.worst_case is None:
        # A partial suite (an attack or probe without a result) has only a lower bound: no
        # worst case to select on, so the trial failed.
        attrs.update(status="failed", error=f"robustness suite: {state.robustness}, no complete "
                                            "worst case")  # fmt: skip
        return None, attrs, "failed"
    attrs.update(worst_case=state.worst_case, worst_case_measured=True)
    twin = reference_worst_case(search, "filtered")
    if twin is not None:
        attrs.update(twin_worst_case=twin, gap=state.worst_case - twin)
    return [*values, state.worst_case], attrs, "done"  # type: ignore[return-value]


@contextlib.contextmanager
def _claimed(locks: Path, point: Point) -> Iterator[None]:
    """An exclusive lock on the trial's configuration (LOCKS/<run id>.lock)."""
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{point.id}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def reference_worst_case(search: Search, role: str | None) -> float | None:
    """A robustness reference's worst case (filtered twin, target) under the search's suite,
    from the references' cache (None without robustness, before it ran, or when the cached
    result is partial or was computed on other inputs or weights)."""
    if search.robustness is None or role is None:
        return None
    return search.robustness.reference_worst_case(role)


def _ingest(store: Path, point: Point) -> None:
    with Store(store) as s:
        if (point.run_dir / "run.json").exists():
            s.ingest(point.run_dir)
        if point.robustness is not None and point.robustness_dir.is_dir():
            s.ingest_tree(point.robustness_dir)


def _timing(out: Path, number: int, seconds: float, overhead: float) -> None:
    """One line per trial (O_APPEND: whole lines from concurrent workers on one machine)."""
    line = json.dumps({"trial": number, "trial_s": round(seconds, 3),
                       "overhead_s": round(overhead, 4)}) + "\n"  # fmt: skip
    fd = os.open(out / "timing.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _summary(attrs: dict[str, Any]) -> str:
    if "forget" not in attrs:
        return f": {attrs['error']}" if attrs.get("error") else ""
    text = f": forget {100 * attrs['forget']:.2f}% retain {100 * attrs['retain']:.2f}%"
    text += f" (margin {100 * attrs['margin']:+.2f}; selection questions)"
    if attrs.get("worst_case_measured"):
        text += f" worst case {100 * attrs['worst_case']:.2f}%"
    return text
