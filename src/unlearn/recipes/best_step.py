"""The best evaluated step of a run by the boundary rule, its model kept in OUT/best
(--save_best of `unlearn run` and `unlearn distill`).

    keeper = BestKeeper.open(session, delta=0.02, merge=True)   # resumes what OUT/best holds
    keeper.consider(step, accs, collapsed, model, tokenizer)    # after each evaluation

The rule is the one searches and robustness suites apply (`robustness.score`): a step counts
when every retain task is evaluated and within `delta` of its own value at step 0; among the
counting steps the best has the lowest accuracy on the suite's first forget task (ties: the
higher retain minimum, then the earlier step).

Design choices:
- Step 0 is the reference, not a candidate: it is the model the run started from, which the user
  already has. When no trained step counts, nothing is saved and run.json's `best` stays null.
- A step whose evaluation collapsed is not a candidate (a degenerate model is never "best"),
  nor is one with a failed forget or retain task.
- OUT/best is replaced in one rename (`fsutil.atomic_dir`), and only by a better step: it holds
  model/ (and adapter/ for LoRA) saved by `ActiveRun.save_model`, the run's stamp and best.json
  (the step and its scores). best.json travels with the weights, so it is the truth about what
  OUT/best holds; run.json's `best` is its copy, written right after.
- Resume: evals.jsonl keeps the rows up to the checkpoint's step. OUT/best is kept when its step
  is among them (always so after a preemption: the checkpoint is written after that step's
  evaluation); otherwise (a crash resumed from an older periodic checkpoint) it is deleted with
  its record, since the steps it was chosen over have been replaced and will be evaluated again.
  Rank 0 reads the files and hands the state to the other ranks, so every rank takes the same
  decisions: saving is collective (FSDP2 gathers the weights on every rank).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from unlearn.distributed import Parallel, slow_group
from unlearn.fsutil import atomic_dir
from unlearn.robustness.score import CurvePoint, constrained_curve, curve_point
from unlearn.runs.rows import EvalRow, RunMeta
from unlearn.runs.rundir import BEST_DIR

if TYPE_CHECKING:
    from unlearn.recipes.skeleton import Session
    from unlearn.runs.lifecycle import ActiveRun

BEST_FILE = "best.json"
"""In OUT/best: {step, forget_task, forget, retains, reference, delta, model} of its model."""


def counts(reference: CurvePoint, point: CurvePoint, delta: float) -> bool:
    """Whether `point` has a forget accuracy and keeps every retain task within `delta` of its
    value at the `reference` (step 0)."""
    return bool(constrained_curve([reference, point], delta)[-1]["counts"])


def rank_key(point: CurvePoint) -> tuple[float, float, int]:
    """Lower is better: forget accuracy, then the retain minimum (higher), then the step."""
    return (point.heldout, -(point.retain or 0.0), point.step)  # type: ignore[return-value]


def accs_by_step(evals: list[EvalRow]) -> dict[int, dict[str, float]]:
    """{step: {task: accuracy}} of the done accuracy rows of evals.jsonl."""
    out: dict[int, dict[str, float]] = {}
    for e in evals:
        if e.metric == "acc" and e.status == "done" and e.value is not None:
            out.setdefault(e.step, {})[e.task] = e.value
    return out


@dataclass
class BestKeeper:
    """The best-so-far of one run, and OUT/best kept in step with it."""

    run: ActiveRun
    parallel: Parallel
    forget_task: str
    retain_tasks: list[str]
    delta: float
    merge: bool
    reference: CurvePoint | None = None
    best: CurvePoint | None = None

    @classmethod
    def open(cls, session: Session, delta: float, merge: bool) -> BestKeeper:
        """The keeper of `session`'s run, with what a resumed run already chose (see the
        module's docstring); `merge`: also save a LoRA model merged (OUT/best/model)."""
        suite = session.suite.suite  # type: ignore[union-attr]
        keeper = cls(session.run, session.parallel, suite.forget[0], suite.retain, delta, merge)
        state = keeper._read_back() if session.parallel.is_main else None
        if session.parallel.enabled and session.parallel.world_size > 1:
            box = [state]
            dist.broadcast_object_list(box, src=0, group=slow_group())
            state = box[0]
        if state is not None:
            reference, best = state
            keeper.reference = keeper._point(0, reference) if reference is not None else None
            keeper.best = keeper._point(*best) if best is not None else None
        return keeper

    def _point(self, step: int, accs: dict[str, float | None]) -> CurvePoint:
        return curve_point(step, accs, self.forget_task, self.retain_tasks)

    @property
    def folder(self) -> Path:
        return self.run.out / BEST_DIR

    def consider(
        self,
        step: int,
        accs: dict[str, float | None],
        collapsed: bool,
        model: Any,
        tokenizer: Any,
    ) -> bool:
        """Take one evaluated step (its {task: accuracy}); step 0 becomes the reference, a
        later step that counts and beats the best so far replaces OUT/best. Returns whether it
        did. Every rank must call it with the same values (they are gathered: eval.suite)."""
        point = self._point(step, accs)
        if step == 0:
            self.reference = point
            return False
        if collapsed or self.reference is None or not counts(self.reference, point, self.delta):
            return False
        if self.best is not None and rank_key(point) >= rank_key(self.best):
            return False
        self._save(point, model, tokenizer)
        return True

    def record(self, point: CurvePoint, paths: dict[str, str]) -> dict[str, Any]:
        """best.json / run.json's `best` for `point` saved at `paths` (model, adapter)."""
        return {
            "step": point.step,
            "forget_task": self.forget_task,
            "forget": point.heldout,
            "retains": dict(point.retains),
            "reference": dict(self.reference.retains) if self.reference else {},
            "delta": self.delta,
            "model": paths.get("model", paths.get("adapter")),
        }

    def _save(self, point: CurvePoint, model: Any, tokenizer: Any) -> None:
        """Replace OUT/best with the live model (collective: every rank calls it)."""
        run, folder = self.run, self.folder
        if not self.parallel.is_main:  # rank 0 writes; the others take part in the gathering
            run.save_model(self.parallel, model, tokenizer, self.merge, into=folder)
            self.best = point
            return
        with atomic_dir(folder) as tmp:
            saved = run.save_model(self.parallel, model, tokenizer, self.merge, into=tmp)
            paths = {name: str(folder / Path(path).name) for name, path in saved.items()}
            record = self.record(point, paths)
            for name, text in run.dir.owner_files(run.meta).items():
                (tmp / name).write_text(text)
            (tmp / BEST_FILE).write_text(json.dumps(record, indent=1) + "\n")
        self.best = point
        run.update(best=record)

    def _read_back(self) -> tuple[dict | None, tuple[int, dict] | None] | None:
        """Rank 0, when the run opens: (step-0 accuracies, (best step, its accuracies)) from the
        files a resumed run kept; None for a fresh run. Drops an OUT/best whose step's rows are
        gone (see the module's docstring)."""
        record = self.run.dir.read()
        by_step = accs_by_step(record.evals)
        held = self._held()
        best = None
        if held is not None and held.get("step") in by_step:
            best = (held["step"], by_step[held["step"]])
            if record.meta.best != held:
                self.run.update(best=held)
        else:
            if self.folder.exists() and self.run.dir.owns(self.folder):
                shutil.rmtree(self.folder)
            if record.meta.best is not None:
                self.run.update(best=None)
        if not record.evals:
            return None
        return by_step.get(0), best

    def _held(self) -> dict | None:
        """best.json of the OUT/best this run saved (None: none, or not this run's)."""
        folder = self.folder
        if not folder.is_dir() or not self.run.dir.owns(folder):
            return None
        try:
            held = json.loads((folder / BEST_FILE).read_text())
        except (OSError, ValueError):
            return None
        return held if isinstance(held, dict) else None


def best_line(meta: RunMeta) -> str | None:
    """The line a command prints about --save_best's choice (None without --save_best)."""
    best = meta.best
    if best is not None:
        forget = best.get("forget")
        shown = f"{100 * forget:.2f}%" if isinstance(forget, (int, float)) else "?"
        return (
            f"best step: {best['step']} ({best.get('forget_task')} {shown}, every retain task"
            f" within {best.get('delta')} of step 0): {best.get('model')}"
        )
    if not meta.config.get("save_best"):
        return None
    return "best step: none (no evaluated step kept every retain task within --delta of step 0)"
