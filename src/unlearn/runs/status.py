"""How a run's status is decided: the one place for the rules (the lifecycle applies them while a
run lives; the store and sweeps apply `effective_status` when they read one).

- An exception that ends a run gets the status of the first matching row of `OUTCOMES`.
- A run that ends cleanly is "done", made worse by its evaluations (`worse`): a failed task makes
  it "failed", a collapsed result "collapsed" (failed wins). A collapse marks only runs whose
  result is one model (unlearn, baseline); an attack's curve may pass through a collapsed model.
- A "done" run without evaluation rows reads as failed wherever it is read: a missing evaluation
  must never pass for a result.
"""

from __future__ import annotations

from dataclasses import dataclass

from unlearn.errors import (
    CollectiveFailure,
    DivergedError,
    Preempted,
    Pruned,
    RetainZeroError,
    SaveFailed,
)


@dataclass(frozen=True)
class Outcome:
    """What an exception that ends a run means for it."""

    status: str
    finished: bool = True
    """Stamp the finish time (not for a preemption: the run goes on when resumed)."""
    reraise: bool = False
    """Raise it again after recording it (an unexpected error: the caller sees the traceback)."""
    every_rank: bool = False
    """Every rank that saw it prints its line (it names the rank), not only rank 0."""


OUTCOMES: tuple[tuple[type[BaseException], Outcome], ...] = (
    (Preempted, Outcome("preempted", finished=False)),
    (DivergedError, Outcome("diverged")),
    (Pruned, Outcome("pruned")),
    (RetainZeroError, Outcome("failed")),
    (SaveFailed, Outcome("failed")),
    (CollectiveFailure, Outcome("failed", every_rank=True)),
    (BaseException, Outcome("failed", reraise=True)),
)
"""Exception -> run status, first match wins. The expected ones are results, reported in one
line; anything else (a bug, Ctrl-C) is recorded as failed and keeps its traceback."""

COLLAPSE_MARKS = ("unlearn", "baseline")
"""Run kinds whose status a collapsed evaluation changes."""
NO_EVALS_ERROR = "no eval results"
_SEVERITY = {"done": 0, "collapsed": 1, "failed": 2}


def outcome_of(error: BaseException) -> Outcome:
    """The row of OUTCOMES that `error` matches."""
    return next(outcome for cls, outcome in OUTCOMES if isinstance(error, cls))


def error_text(error: BaseException) -> str:
    """run.json's error for an exception: the message of an expected one, type and message of
    anything else."""
    return f"{type(error).__name__}: {error}" if outcome_of(error).reraise else str(error)


def worse(status: str, other: str) -> str:
    """The worse of two evaluation outcomes: failed > collapsed > done."""
    return max(status, other, key=_SEVERITY.__getitem__)


def effective_status(status: str, has_evals: bool) -> tuple[str, str | None]:
    """(status, error or None) as readers must see a run: "done" without evaluation rows is
    failed."""
    if status == "done" and not has_evals:
        return "failed", NO_EVALS_ERROR
    return status, None
