"""Running a sweep: each point's runs, the executors that decide where they run, `run_sweep`.

    states = run_sweep(sweep)          # run (or resume) every point with the local executor

Design choices:
- Executors only decide where and when points run. What a point does is `run_point`, a plain
  function of a picklable `Point`, so a SLURM executor (unlearn.sweep.slurm) can ship it to a
  job; the local one runs points one after another in this process.
- A run.json still saying running or pending was left by a killed sweep (the sweep lock rules
  out another live sweep on the same directory): it is marked failed ("interrupted"). A failed
  point is re-run from an empty run directory, so no stale metric or eval row mixes with the new
  ones; re-running a point's unlearning also discards its old attack (it attacked another model).
- Runs record their own status through the run lifecycle (unlearn.runs.lifecycle); a sweep only
  marks failed, through `mark_failed`, a run that could not record how it ended.
- The store is an index: runs write it themselves while they train (status running), and the
  sweep ingests each point's run directories again after the point ends, whatever happened.
- A stop signal (SIGTERM, SIGUSR1/2) ends a local sweep after the point in progress with
  SweepPreempted (the CLI exits 75); the point checkpoints if it was training.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import sys
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from unlearn.errors import UsageError
from unlearn.recipes.attack import run_attack
from unlearn.recipes.baseline import run_baseline
from unlearn.recipes.distill import run_distill
from unlearn.recipes.unlearning import Monitor, run_unlearning
from unlearn.runs.lifecycle import mark_failed
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RunDir, latest_checkpoint
from unlearn.runs.store import Store
from unlearn.sweep.points import Point
from unlearn.sweep.spec import LOCK_FILE, Sweep
from unlearn.sweep.state import FINISHED, PointState, inspect_point
from unlearn.sweep.table import counter, show_value, state_line
from unlearn.training.preemption import deferring_signals, stop_requested

# -- running a point --------------------------------------------------------------------------


def run_point(point: Point, monitor: Monitor | None = None) -> PointState:
    """Unlearn (evaluation included) unless finished, then (if asked and the run is done) attack,
    distil and run the robustness suite on its model. `monitor` (a search's pruner) evaluates
    during training; a pruned run is final here like a finished one (the pruner decided).

    An exception is recorded in the run directory as status failed (and printed with its
    traceback), never raised: one bad point must not stop a sweep. KeyboardInterrupt does stop
    it (the run records itself as failed on the way out).
    """
    state = inspect_point(point)
    if point.baseline is not None:
        if state.status not in FINISHED:
            _clear(point.run_dir)
            b = point.baseline
            meta = RunMeta(point.id, "baseline", config={"name": b.label, "role": b.role})
            _guarded(point.run_dir, meta, lambda: run_baseline(
                b.label, b.model_args, b.suite, point.run_dir, b.role, b.world, None,
                b.eval_batch_size, point.id, tracking=point.tracking,
            ))  # fmt: skip
            state = inspect_point(point)
        return state
    if state.status not in (*FINISHED, "pruned"):
        _clear(point.run_dir)
        if point.attack_dir is not None:
            _clear(point.attack_dir, keep_checkpoint=False)  # it attacked another model
        if point.robustness is not None:
            _clear(point.robustness_dir, keep_checkpoint=False)  # it scored another model
        if point.distill is not None:
            _clear(point.distill_dir, keep_checkpoint=False)  # it distilled another model
        meta = RunMeta(point.id, "unlearn", point.method, point.run_config.to_dict())
        _guarded(point.run_dir, meta, lambda: run_unlearning(point.run_config, monitor))
        state = inspect_point(point)
    if point.attack_config is not None and point.attack_dir is not None:
        cfg = point.attack_config
        meta = RunMeta(f"{point.id}-attack", "attack", config=cfg.to_dict(), parent=point.id)
        state = _then(point, state, state.attack, point.attack_dir, meta, lambda: run_attack(cfg))
    if point.distill is not None:
        dcfg = point.distill
        meta = RunMeta(f"{point.id}-distill", "unlearn", "distill", parent=point.id)
        state = _then(point, state, state.distill, point.distill_dir, meta,
                      lambda: run_distill(dcfg))  # fmt: skip
    if point.robustness is not None:
        plan, store = point.robustness, point.run_config.args.store
        meta = RunMeta(f"{point.id}-robustness", "robustness", parent=point.id)
        model = str(point.run_dir / "model")
        # Not cleared: its finished attacks and probes are kept and skipped (robustness.evaluate).
        state = _then(point, state, state.robustness, point.robustness_dir, meta,
                      lambda: plan.run(model, point.id, point.robustness_dir, point.id, store,
                                       point.tracking),
                      clear=False)  # fmt: skip
    return state


def _then(
    point: Point,
    state: PointState,
    status: str | None,
    run_dir: Path,
    meta: RunMeta,
    fn: Callable[[], object],
    clear: bool = True,
) -> PointState:
    """A stage after the point's unlearning (its attack, distillation, robustness suite): run
    it unless the point is not done, the stage finished, or the sweep was signalled (the stage
    waits for the rerun); returns the point's state after it."""
    if state.status != "done" or status in FINISHED or stop_requested():
        return state
    if clear:
        _clear(run_dir)
    _guarded(run_dir, meta, fn)
    return inspect_point(point)


def _clear(path: Path, keep_checkpoint: bool = True) -> None:
    """Remove a previous attempt's run directory (its failure was recorded and reported),
    unless it holds a resumable checkpoint (a preempted or killed run): the run resumes from it.
    In a job with several tasks only rank 0 clears (the others would delete its new files)."""
    if os.environ.get("RANK", "0") != "0":
        return
    if keep_checkpoint and latest_checkpoint(path) is not None:
        return
    if path.exists():
        shutil.rmtree(path)


def _guarded(run_dir: Path, meta: RunMeta, fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        record_failure(run_dir, meta, f"{type(e).__name__}: {e}")


def record_failure(run_dir: Path, meta: RunMeta, error: str) -> None:
    """Make sure the run directory says failed (a run that raised before writing run.json, one
    whose own failure handling did not get to run, or a preempted one that could not resume,
    e.g. from a damaged checkpoint: its old "preempted" would hide the reason)."""
    mark_failed(run_dir, error, fresh=meta, unfinished=("running", "pending", "preempted"))


# -- executors ----------------------------------------------------------------------------------


OnStart = Callable[[Point], None]
OnDone = Callable[[Point, PointState], None]


class Executor(ABC):
    """Where and when points run. `submit` runs every point with `run_point`, calls
    `on_start(point)` when one starts and `on_done(point, state)` when it ends (the sweep reports
    and ingests there), and returns when all have ended. A cluster executor submits one job per
    point (Point is picklable) and calls the hooks as jobs start and finish."""

    @abstractmethod
    def submit(self, points: Sequence[Point], on_start: OnStart, on_done: OnDone) -> None: ...


class SweepPreempted(Exception):
    """The sweep's process got SIGTERM/SIGUSR1/SIGUSR2: it stopped after the point in progress
    (which checkpointed, if it was training). Running the same sweep again resumes."""

    def __init__(self, signum: int, point_id: str) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name} during point {point_id}"
            " (run the same command again to resume)"
        )
        self.signum, self.point_id = signum, point_id
        self.states: list[PointState] = []
        """Every point's state when the sweep stopped, in spec order (set by run_sweep)."""


class LocalExecutor(Executor):
    """One point after another in this process.

    A stop signal (SIGTERM: preemption; SIGUSR1/2: the time limit is near) ends the sweep after
    the point in progress, never starting the next one: a training run checkpoints and records
    status preempted, anything else (loading, evaluation) finishes first. Then SweepPreempted.
    """

    def submit(self, points: Sequence[Point], on_start: OnStart, on_done: OnDone) -> None:
        with deferring_signals() as latch:
            for i, point in enumerate(points):
                on_start(point)
                state = run_point(point)
                on_done(point, state)
                if latch.signum is not None and (i + 1 < len(points) or not state.finished):
                    raise SweepPreempted(latch.signum, point.id)


@contextlib.contextmanager
def sweep_lock(out: Path, what: str = "sweep") -> Iterator[None]:
    """One live sweep (or search) per output directory: what makes a leftover "running" mean
    interrupted."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as f:  # "a+": a refused second process truncates nothing
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another {what} is running in {out}") from None
        # The lock file also says who owns OUT (`spec.out_kind`): a sweep never writes into a
        # search's OUT, nor a search into a sweep's.
        f.seek(0)
        f.truncate()
        f.write(what)
        f.flush()
        yield  # closing the file releases the lock


def _ingest(store: Path, *dirs: Path | None) -> None:
    with Store(store) as s:
        for d in dirs:
            if d is not None and RunDir(d).exists():
                s.ingest(d)


def _mark_interrupted(sweep: Sweep) -> list[str]:
    """Runs left running/pending by a killed sweep become failed ("interrupted")."""
    marked = []
    for p in sweep.points:
        dirs = (p.run_dir, p.attack_dir, p.distill_dir if p.distill else None,
                p.robustness_dir if p.robustness else None)  # fmt: skip
        for d in dirs:
            if d is not None and mark_failed(d, "interrupted"):
                _ingest(sweep.store, d)
                marked.append(d.name)
    return marked


def run_sweep(
    sweep: Sweep,
    executor: Executor | None = None,
    log: Callable[[str], None] = print,
    after_point: OnDone | None = None,
) -> list[PointState]:
    """Run every point not finished yet; returns each point's final state in spec order.

    `after_point(point, state)` is called as each point run here ends, after it is indexed (the
    demo queues the attack on a method's best run as soon as its points have ended)."""
    executor = executor or LocalExecutor()
    index = {p.id: i for i, p in enumerate(sweep.points)}
    states: dict[str, PointState] = {}
    with sweep_lock(sweep.out):
        for name in _mark_interrupted(sweep):
            log(f"{name}: interrupted by an earlier sweep, marked failed; re-running")
        todo = []
        for p in sweep.points:
            state = inspect_point(p)
            if state.finished:
                states[p.id] = state
                log(f"{counter(index[p.id], sweep)} {state_line(state)} (finished earlier)")
            else:
                todo.append(p)
        if todo:
            log(f"{len(todo)} point(s) to run, results in {sweep.out}")

        def on_start(point: Point) -> None:
            values = " ".join(f"{k}={show_value(v)}" for k, v in point.varied.items())
            log(f"{counter(index[point.id], sweep)} {point.id}: starting {values}".rstrip())

        def on_done(point: Point, state: PointState) -> None:
            robustness = point.robustness_dir if point.robustness is not None else None
            distilled = point.distill_dir if point.distill is not None else None
            _ingest(sweep.store, point.run_dir, point.attack_dir, distilled)
            if robustness is not None and robustness.is_dir():
                with Store(sweep.store) as s:
                    s.ingest_tree(robustness)
            states[point.id] = state
            log(f"{counter(index[point.id], sweep)} {state_line(state)}")
            if after_point is not None:
                after_point(point, state)

        try:
            executor.submit(todo, on_start, on_done)
        except SweepPreempted as e:
            e.states = [states.get(p.id) or inspect_point(p) for p in sweep.points]
            raise
    return [states[p.id] for p in sweep.points]
