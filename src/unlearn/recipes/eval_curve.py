"""Evaluation during training: the suite scored on the live model while a run trains, recorded
in evals.jsonl as the run's curve (and through the run to its trackers and the report's training
curves); a search's pruner reads the same evaluations (`Monitor`).

    args = CurveArgs(eval_every=10, save_best=True)   # run's and distill's --eval_every ...
    args.check(train_config, suite)                   # before any weights load
    on_step = live_evaluations(session, model, tokenizer, 64, total, args.eval_every, ...)
    ...
    final_evaluation(session, model, tokenizer, 64, total, keeper)

Design choices:
- One callback (the training loop's on_step) serves --eval_every and a pruner's `Monitor`: a
  step both want is evaluated once.
- Step 0 (the model the run starts from) and every --eval_every steps before the last are
  intermediate evaluations (`ActiveRun.evaluate(final=False)`): recorded, reported, never
  deciding the run's status. The last step is the run's final evaluation, after the save, so
  the curve ends there without a duplicate point.
- --eval_limit applies to every evaluation of the run, the final one too: the points of one
  curve, and the step-0 values the boundary rule compares with, score the same documents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unlearn.distributed import env_world_size
from unlearn.errors import UsageError

if TYPE_CHECKING:
    from unlearn.config.settings import TrainConfig
    from unlearn.eval.suite import Suite
    from unlearn.recipes.best_step import BestKeeper
    from unlearn.recipes.skeleton import Session

DEFAULT_DELTA = 0.02
"""The boundary rule's default margin: a search's default `delta` (`search.spec`)."""


@dataclass
class CurveArgs:
    """Evaluation during training (a config section of `unlearn run` and `unlearn distill`)."""

    eval_every: int | None = None
    """Also evaluate the suite on the live model at step 0 and every N optimizer steps
    (evals.jsonl, trackers, the report's training curves); --eval_limit keeps it cheap."""
    save_best: bool = False
    """Keep OUT/best: the model of the evaluated step with the lowest forget accuracy among those
    keeping every retain task within --delta of its step-0 value (needs --eval_every)."""
    delta: float | None = None
    """--save_best's margin below each retain task's step-0 accuracy (default 0.02)."""

    def __post_init__(self) -> None:
        if self.eval_every is not None and self.eval_every < 1:
            raise UsageError(f"--eval_every must be >= 1, got {self.eval_every}")
        if self.save_best and self.eval_every is None:
            raise UsageError("--save_best needs --eval_every (the evaluated steps it chooses from)")
        if self.delta is not None:
            if not self.save_best:
                raise UsageError("--delta is the margin of --save_best: give both or neither")
            if not 0 <= self.delta < 1:
                raise UsageError(f"--delta must be in [0, 1), got {self.delta}")

    @property
    def margin(self) -> float:
        return DEFAULT_DELTA if self.delta is None else self.delta

    def check(self, train: TrainConfig, suite: Suite | None) -> None:
        """What needs the training settings and the resolved suite (None: --eval false), before
        any weights load: the interval fits in the run, and the suite has what the rule reads."""
        if self.eval_every is None:
            return
        if suite is None:
            raise UsageError("--eval_every needs the evaluation: drop --eval false")
        steps = train.steps(env_world_size())
        if self.eval_every > steps:
            raise UsageError(
                f"--eval_every {self.eval_every} is larger than the run ({steps} optimizer steps)"
            )
        if self.save_best and not suite.retain:
            # Without a retain task nothing holds the rule back: a broken model forgets most.
            raise UsageError("--save_best needs a retain task (--retain_tasks) to hold the rule")


def curve_fields(args: CurveArgs) -> dict[str, Any]:
    """The fields given (none: the defaults), for run.json's config and resume checks: a
    resumed run must keep the curve's steps and the rule of the best it kept."""
    defaults = dataclasses.asdict(CurveArgs())
    return {k: v for k, v in dataclasses.asdict(args).items() if v != defaults[k]}


@dataclass
class Monitor:
    """Intermediate evaluations while a run trains (a search's pruner, unlearn.search).

    Training is cut into `parts` equal parts; after each but the last (the final evaluation
    follows it) the suite is scored on the live model, the rows are recorded in evals.jsonl at
    that step, and `report(k, {task: acc})` is called with the part's number k (runs of
    different lengths report at the same fractions, which is what a pruner compares); it may
    raise `unlearn.errors.Pruned`, which ends the run with status pruned (no result)."""

    parts: int
    report: Callable[[int, dict[str, float | None]], None]

    def __post_init__(self) -> None:
        if self.parts < 2:
            raise UsageError(f"intermediate evaluations need parts >= 2, got {self.parts}")

    def part_at(self, step: int, total: int) -> int | None:
        """The part k whose end is optimizer step `step` of `total` (None: not an end)."""
        for k in range(1, self.parts):
            if step == max(1, round(total * k / self.parts)) and step < total:
                return k
        return None


def evaluate_step(
    session: Session, score: Callable[[str], Any], step: int, final: bool
) -> tuple[dict[str, float | None], bool]:
    """Score the suite with `score`, record the rows at `step` (`ActiveRun.evaluate`); returns
    ({task: accuracy, None where failed or not an accuracy}, whether any task collapsed)."""
    suite = session.suite.suite  # type: ignore[union-attr]
    accs: dict[str, float | None] = {}
    collapsed: list[bool] = []

    def scored(task: str):
        metrics, broke = score(task)
        accs[task] = metrics.get("acc")
        collapsed.append(bool(broke))
        return metrics, broke

    session.run.evaluate(step, suite.task_keys(), scored, suite.metric, final=final)
    return accs, any(collapsed)


def live_evaluations(
    session: Session,
    model: Any,
    tokenizer: Any,
    batch_size: int,
    total_steps: int,
    every: int | None = None,
    monitor: Monitor | None = None,
    keeper: BestKeeper | None = None,
) -> Callable[[int], None] | None:
    """The training loop's on_step: evaluate at step 0 and every `every` steps before the last,
    and at the ends of `monitor`'s parts (then report to it); hand each evaluation to the
    `keeper` (--save_best). None when nothing is evaluated during training."""
    if session.suite is None or (every is None and monitor is None):
        return None
    if monitor is not None and session.parallel.world_size > 1:
        raise UsageError("intermediate evaluations (a search's pruner) run in one process only")
    score = session.suite.scorer(model, tokenizer, batch_size)

    def on_step(step: int) -> None:
        due = every is not None and step % every == 0 and step < total_steps
        part = monitor.part_at(step, total_steps) if monitor is not None and step else None
        if not due and part is None:
            return
        accs, collapsed = evaluate_step(session, score, step, final=False)
        if keeper is not None:
            keeper.consider(step, accs, collapsed, model, tokenizer)
        if monitor is not None and part is not None:
            monitor.report(part, accs)

    return on_step


def final_evaluation(
    session: Session,
    model: Any,
    tokenizer: Any,
    batch_size: int,
    step: int,
    keeper: BestKeeper | None = None,
) -> None:
    """The run's final evaluation of the live model (no save/load round trip), which decides
    its status; the last point of a curve, and a candidate of --save_best."""
    score = session.suite.scorer(model, tokenizer, batch_size)  # type: ignore[union-attr]
    accs, collapsed = evaluate_step(session, score, step, final=True)
    if keeper is not None:
        keeper.consider(step, accs, collapsed, model, tokenizer)
