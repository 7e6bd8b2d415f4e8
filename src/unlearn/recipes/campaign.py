"""The campaign the reference campaign run by hand, as one function: baselines -> unlearning sweeps
-> a robustness suite on the best run of each method (and on the filtered twin and the original
target, the references of its scorecard) -> report. `unlearn demo` runs it on the mini world; every
stage resumes from its run directories.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from unlearn.config.settings import ModelArgs
from unlearn.eval.suite import SuiteArgs
from unlearn.models.refs import resolve_model
from unlearn.recipes.baseline import run_baseline
from unlearn.robustness.per_model import SuiteInputs, evaluate_model
from unlearn.runs.lifecycle import mark_failed
from unlearn.runs.rundir import RunDir
from unlearn.runs.store import Store

if TYPE_CHECKING:
    from unlearn.sweep.points import Point
    from unlearn.sweep.state import PointState
    from unlearn.sweep.workers import WorkerPool

BASELINES = (("target", "Target (to unlearn)"), ("ignorant", "Ignorant checkpoint (source)"),
             ("filtered", "Filtered twin (gold standard)"))  # fmt: skip


def baseline_runs(world, runs_dir: Path, store_path: Path, log: Callable[[str], None]) -> dict:
    """Evaluate the world's target, ignorant checkpoint and filtered twin as baseline runs."""
    paths = {"target": world.target, "ignorant": world.ignorant_checkpoint,
             "filtered": world.filtered}  # fmt: skip
    metas = {}
    for role, name in BASELINES:
        path = runs_dir / f"baseline-{role}"
        if RunDir(path).exists() and RunDir(path).read_meta().status == "done":
            metas[role] = RunDir(path).read_meta()
            continue
        metas[role] = run_baseline(
            name, ModelArgs(str(paths[role])), SuiteArgs(), path, role, world.root, store_path
        )
        log(f"baseline {name}: {metas[role].status}")
    return metas


def final_acc(run_dir: Path, task: str) -> float | None:
    """Latest accuracy of `task` in a run directory (None if missing or failed)."""
    rows = [e for e in RunDir(run_dir).read().evals if e.task == task and e.metric == "acc"]
    if not rows:
        return None
    last = max(rows, key=lambda e: e.step)
    return last.value if last.status == "done" else None


def retain_floors(target_run: Path, tasks: Sequence[str], margin: float) -> dict[str, float]:
    """{retain task: the target's accuracy on it - margin}: what a best run must keep. A task
    the target has no result on gets no floor (0 - margin: any accuracy passes), as before
    there were several retain tasks."""
    return {task: (final_acc(target_run, task) or 0.0) - margin for task in tasks}


def best_point(states: Sequence[PointState], floors: Mapping[str, float]) -> PointState | None:
    """The done point with the lowest forget accuracy among those that keep EVERY retain task
    at or above its floor (`retain_floors`: the target's accuracy on that task minus a margin);
    ties go to the higher retain aggregate (the minimum over the retain tasks), then the id.
    A point missing a result on a floored task does not qualify."""

    def keeps(s: PointState) -> bool:
        return all(isinstance(s.retains.get(t), float) and s.retains[t] >= f
                   for t, f in floors.items())  # fmt: skip

    candidates = [
        (s.forget, -s.retain, s.id, s)
        for s in states
        if s.status == "done"
        and isinstance(s.forget, float)
        and isinstance(s.retain, float)
        and keeps(s)
    ]
    return min(candidates)[3] if candidates else None


def write_spec(path: Path, world: Path, sweeps: list[dict], name: str) -> Path:
    spec = {"name": name, "world": str(world), "out": str(path.parent / "runs"),
            "store": str(path.parent / "store.sqlite"), "sweeps": sweeps}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def robustness_job(
    inputs: SuiteInputs,
    model: str,
    label: str,
    role: str,
    out: Path,
    parent: str | None,
    store_path: Path,
    original: float | None,
) -> str:
    """One model's robustness suite, as a worker-pool job (module level: picklable); returns
    the status of its robustness run."""
    ref = resolve_model(model)
    row = evaluate_model(inputs, ref, label, role, out, f"robustness-{label}", parent,
                         store_path, original)  # fmt: skip
    return row["status"]


class CampaignRobustness:
    """The campaign's robustness suites as worker-pool jobs: the reference models' whenever a
    worker is idle, each method's best run as soon as all of that method's points have ended
    (instead of after the whole sweep), so the suites overlap the remaining points."""

    def __init__(
        self,
        pool: WorkerPool,
        world,
        runs_dir: Path,
        store_path: Path,
        inputs: SuiteInputs,
        original: float | None,
        points: Sequence[Point],
        retain_floors: Mapping[str, float],
        log: Callable[[str], None],
    ) -> None:
        self.pool, self.world, self.log = pool, world, log
        self.runs_dir, self.store_path = runs_dir, store_path
        self.inputs, self.original = inputs, original
        self.points = {p.id: p for p in points}
        self.retain_floors = dict(retain_floors)
        self.states: dict[str, PointState] = {}
        self.best: dict[str, str | None] = {}
        """Method -> its best run id (None: no run kept every retain task), once its points
        have ended."""
        self.jobs: dict[Future, str] = {}

    def attack(
        self,
        label: str,
        model: str,
        parent: str | None,
        role: str = "model",
        background: bool = False,
    ) -> None:
        """Queue the suite on `model` (runs/robustness-LABEL) unless it finished earlier."""
        out = self.runs_dir / f"robustness-{label}"
        if RunDir(out).exists() and RunDir(out).read_meta().status == "done":
            self.log(f"robustness {label}: done earlier")
            return

        def started() -> None:
            self.log(f"robustness {label}: starting")

        future = self.pool.submit(
            robustness_job, self.inputs, model, label, role, out, parent, self.store_path,
            self.original, background=background, on_start=started,
        )  # fmt: skip
        self.jobs[future] = label

    def point_done(self, _point: Point | None, state: PointState) -> None:
        """Record a point's final state; attack its method's best run once all have ended."""
        self.states[state.id] = state
        method = self.points[state.id].method
        ids = [i for i, p in self.points.items() if p.method == method]
        if method in self.best or any(i not in self.states for i in ids):
            return
        best = best_point([self.states[i] for i in ids], self.retain_floors)
        self.best[method] = best.id if best else None
        if best is None:
            self.log(f"{method}: no run kept every retain task within the margin; not attacked")
            return
        self.attack(best.id, str(self.points[best.id].run_dir / "model"), best.id)

    def ended(self, future: Future) -> None:
        """Log a suite's outcome; a worker that died leaves its run failed, not running."""
        if future.cancelled():
            return
        label = self.jobs[future]
        try:
            status = future.result()
        except Exception as e:  # the run records its own failures; this is a dead worker
            status = f"failed ({type(e).__name__}: {e})"
            run_dir = self.runs_dir / f"robustness-{label}"
            mark_failed(run_dir, f"worker process ended: {type(e).__name__}: {e}")
            with Store(self.store_path) as store:
                if RunDir(run_dir).exists():
                    store.ingest(run_dir)
        self.log(f"robustness {label}: {status}")

    def best_ids(self) -> list[str]:
        """The best runs (their suites queued), in the sweep's method order."""
        methods = dict.fromkeys(p.method for p in self.points.values())
        return [run_id for m in methods if (run_id := self.best.get(m))]


def print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
