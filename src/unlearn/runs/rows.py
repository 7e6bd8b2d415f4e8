"""The rows of a run directory: run.json's content (`RunMeta`), logged values (`MetricRow`) and
evaluation results (`EvalRow`), each validated when built (unlearn.runs.rundir reads and writes
them).

- A failed evaluation is a row with status "failed", value null and the error text: never a
  number (a missing eval recorded as chance accuracy reads as perfect unlearning).
- Strict JSON has no NaN or infinity. A non-finite loss value (a diverging run) is written as
  null; a non-finite evaluation value turns that row into a failed eval; a value that is not a
  number at all is refused (UsageError).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from unlearn.errors import UsageError

FORMAT = 1
KINDS = ("baseline", "unlearn", "attack", "probe", "robustness")
STATUSES = (
    "pending", "running", "done", "failed", "diverged", "collapsed", "preempted", "pruned",
)  # fmt: skip
"""preempted: stopped by a signal after writing OUT/checkpoint; rerunning the command resumes.
pruned: a search's pruner stopped it after an intermediate evaluation (no result)."""
EVAL_STATUSES = ("done", "failed")
STDERR_SUFFIX = "_stderr"
"""`append_eval({"acc": 0.4, "acc_stderr": 0.01})` stores one row `acc` with its stderr
(lm-evaluation-harness names standard errors this way)."""


def utc_now() -> str:
    """The current time as an ISO-8601 UTC timestamp (seconds), the format of run.json times."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _finite_or_none(value: Any, what: str) -> float | None:
    """A float for a finite number, None for NaN/inf/None; UsageError for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{what} must be a number, got {value!r}")
    return float(value) if math.isfinite(value) else None


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UsageError(f"step must be an integer >= 0, got {step!r}")
    return step


@dataclass
class RunMeta:
    """The content of run.json."""

    id: str
    kind: str
    """baseline (a reference model evaluated as is), unlearn, attack, probe (a white-box probe of
    a robustness suite: no weight changes) or robustness (one model's suite: its attacks and
    probes are the runs whose parent it is)."""
    method: str | None = None
    """The unlearning method's registry name; required for kind "unlearn"."""
    config: dict[str, Any] = field(default_factory=dict)
    """The run's full configuration. Baselines carry {"name": display name, "role": "target" |
    "ignorant" | "filtered"}; the report labels them by name and finds the original by role."""
    status: str = "pending"
    created: str | None = field(default_factory=utc_now)
    started: str | None = None
    finished: str | None = None
    job_id: str | None = None
    model_path: str | None = None
    parent: str | None = None
    """For an attack: the run id (or model path) of the model it started from."""
    error: str | None = None
    final: dict[str, float | None] = field(default_factory=dict)
    """Final value of each named loss term (None when non-finite)."""
    best: dict[str, Any] | None = None
    """The evaluated step whose model --save_best kept in OUT/best, with its scores
    (`unlearn.recipes.best_step`); None without one."""
    format: int = FORMAT

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or "/" in self.id:
            raise UsageError(f"run id must be a non-empty string without '/', got {self.id!r}")
        if self.kind not in KINDS:
            raise UsageError(f"run kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.status not in STATUSES:
            raise UsageError(
                f"run status must be one of {', '.join(STATUSES)}, got {self.status!r}"
            )
        if self.kind == "unlearn" and not self.method:
            raise UsageError(f"unlearn run {self.id!r} needs a method name")
        if not isinstance(self.config, dict):
            raise UsageError(f"run {self.id!r}: config must be a dict")
        if not isinstance(self.final, dict):
            raise UsageError(f"run {self.id!r}: final must be a dict of loss term values")
        if self.best is not None and not isinstance(self.best, dict):
            raise UsageError(f"run {self.id!r}: best must be a dict or null")
        self.final = {
            str(k): _finite_or_none(v, f"final loss {k!r}") for k, v in self.final.items()
        }
        if self.format != FORMAT:
            raise UsageError(f"run {self.id!r}: unsupported run.json format {self.format!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMeta:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UsageError(f"unknown run.json field(s) {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:  # a required field is missing
            raise UsageError(f"bad run.json content: {e}") from None

    def wall_seconds(self) -> float | None:
        """Seconds from the run's start to its end, None until it has both: its training,
        saving and final evaluation (a resumed run counts from its first start)."""
        if not self.started or not self.finished:
            return None
        elapsed = datetime.fromisoformat(self.finished) - datetime.fromisoformat(self.started)
        return elapsed.total_seconds()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": d.pop("format"), **d}


@dataclass(frozen=True)
class MetricRow:
    """One logged value (a loss term, a coefficient, a learning rate) at one optimizer step."""

    step: int
    name: str
    value: float | None
    """None when the value was not finite."""

    def __post_init__(self) -> None:
        _check_step(self.step)
        if not isinstance(self.name, str) or not self.name:
            raise UsageError(f"metric name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "value", _finite_or_none(self.value, f"metric {self.name!r}"))


@dataclass(frozen=True)
class EvalRow:
    """One metric of one evaluation task at one step; failed rows carry no value."""

    step: int
    task: str
    metric: str
    value: float | None
    stderr: float | None = None
    status: str = "done"
    error: str | None = None

    def __post_init__(self) -> None:
        _check_step(self.step)
        for name in ("task", "metric"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise UsageError(f"eval {name} must be a non-empty string, got {v!r}")
        if self.status not in EVAL_STATUSES:
            raise UsageError(f"eval status must be done or failed, got {self.status!r}")
        for name in ("value", "stderr"):
            # A hand-edited or foreign evals.jsonl can hold any JSON: a string stored as a done
            # result stays text in SQLite and crashes the report later. Refused at ingest.
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UsageError(
                    f"eval {self.task}/{self.metric}: {name} must be a finite number, got {v!r}"
                )
            object.__setattr__(self, name, float(v))
        if self.status == "done" and (self.value is None or self.error is not None):
            raise UsageError(f"a done eval ({self.task}/{self.metric}) needs a value and no error")
        if self.status == "failed" and (self.value is not None or not self.error):
            raise UsageError(f"a failed eval ({self.task}/{self.metric}) needs an error, no value")


def eval_rows(
    step: int,
    task: str,
    metrics: dict[str, Any] | None,
    status: str = "done",
    error: str | None = None,
) -> list[EvalRow]:
    """Turn one task's evaluation result into rows (shared by RunDir and Store).

    `metrics` maps metric names to numbers; `NAME_stderr` keys become the stderr of NAME. A failed
    eval (status "failed") keeps only the metric names, with null values; with metrics=None it is
    recorded under "acc", the metric the report reads. A non-finite value of a done eval makes
    that row failed: it must never be read as a number.
    """
    if status not in EVAL_STATUSES:
        raise UsageError(f"eval status must be done or failed, got {status!r}")
    if status == "done" and error is not None:
        raise UsageError("a done eval cannot carry an error; use status='failed'")
    metrics = dict(metrics or {})
    stderrs = {
        k[: -len(STDERR_SUFFIX)]: metrics.pop(k) for k in list(metrics) if k.endswith(STDERR_SUFFIX)
    }
    orphans = set(stderrs) - set(metrics)
    if orphans:
        raise UsageError(f"eval {task!r}: stderr given without its metric: {sorted(orphans)}")
    if status == "failed":
        names = list(metrics) or ["acc"]
        message = error or "evaluation failed (no error text)"
        return [EvalRow(step, task, m, None, None, "failed", message) for m in names]
    if not metrics:
        raise UsageError(f"eval {task!r}: a done eval needs at least one metric")
    rows = []
    for name, raw in metrics.items():
        value = _finite_or_none(raw, f"eval {task}/{name}")
        if value is None:
            rows.append(
                EvalRow(step, task, name, None, None, "failed", f"non-finite {name}: {raw}")
            )
        else:
            stderr = _finite_or_none(stderrs.get(name), f"eval {task}/{name} stderr")
            rows.append(EvalRow(step, task, name, value, stderr))
    return rows


@dataclass
class RunRecord:
    """Everything a run directory holds."""

    path: Path
    meta: RunMeta
    metrics: list[MetricRow]
    evals: list[EvalRow]
