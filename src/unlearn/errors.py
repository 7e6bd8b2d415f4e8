"""Exceptions with a meaning for the command line.

`UsageError` is bad input: the CLI prints its message as one line on stderr and exits 2, with no
traceback. Raise it before any weights load. The training guards and the model save raise the
others; the run lifecycle (unlearn.runs) records them as run statuses instead of crashing a sweep.
"""

from __future__ import annotations

import signal
from pathlib import Path


class UsageError(Exception):
    """Bad input (config value, unknown name, missing file). Exit code 2, one line."""


class DivergedError(RuntimeError):
    """A loss term went non-finite or exploded; the run is marked `diverged`, nothing is saved."""


class RetainZeroError(RuntimeError):
    """retain_coef > 0 but the retain term stayed exactly 0: the reference equals the model."""


class SaveFailed(RuntimeError):
    """The machine refused a model save (disk full, quota, file size limit); the run is failed,
    reported in one line."""


class Pruned(Exception):
    """A search's pruner stopped the run after an intermediate evaluation (unlearn.search): the
    run is marked `pruned`, a status with no result (its intermediate numbers are in
    evals.jsonl, never in a table as the run's result)."""


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint at `step`
    (unlearn.training.checkpointer); the run is marked `preempted` and the command exits 75
    (rerunning it resumes)."""

    def __init__(self, step: int, signum: int, path: Path) -> None:
        super().__init__(
            f"preempted by {signal.Signals(signum).name} at step {step}; checkpoint {path}"
            " (run the same command again to resume)"
        )
        self.step, self.signum, self.path = step, signum, path


class CollectiveFailure(RuntimeError):
    """A collective of a data-parallel run waited past --collective_timeout or lost a peer
    (ranks that took different paths, a rank that died or hangs): the run is marked failed, and
    every rank that saw it says so in one line naming itself and the step."""
