"""One object a run reports through (`Reporter`): names the run's values and fans them out to
the backends `TrackingArgs.report_to` names.

    reporter = Reporter()
    reporter.open(args, RunInfo(id, kind, out, config))     # rank 0 (`runs.lifecycle`)
    reporter.metrics(step, {"forget": 1.2, "lr": 1e-3})     # train/forget, train/lr
    reporter.evaluation(step, "forget", {"acc": 0.4})       # eval/forget/acc
    reporter.end("done", {"forget": 0.8}, {"forget/acc": 0.3}, config)
    reporter.close()

One naming scheme for every backend: `train/NAME` for each value the training loop logs (loss
terms, coefficients, lr, grad norm, tokens_per_s), `eval/TASK/METRIC` at each evaluation's step
(curves by step), and at the end `final/train/TERM`, `final/eval/TASK/METRIC` and the status,
with the run's final config.
"""

from __future__ import annotations

import sys
from typing import Any

from unlearn.tracking.base import RunInfo, Tracker, TrackingArgs, numbers
from unlearn.tracking.tensorboard_tracker import TensorBoardTracker
from unlearn.tracking.wandb_tracker import WandbTracker

TRACKERS: dict[str, type[Tracker]] = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}
"""Each name of `base.BACKENDS` (--report_to) -> its tracker, which imports its library only
when it opens."""


class Reporter:
    """What a run reports through: names its values and fans them out to the backends. With
    none open (tracking off, ranks > 0) every call does nothing, so callers never check."""

    def __init__(self) -> None:
        self.trackers: list[Tracker] = []

    def open(self, args: TrackingArgs, run: RunInfo) -> None:
        """Open one tracker per backend `args` names (none for report_to none)."""
        for name in args.backends:
            self.trackers.append(TRACKERS[name](args, run))

    def _log(self, step: int, values: dict[str, float]) -> None:
        for t in self.trackers if values else ():
            t.log(step, values)

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        """A row of the training loop's values (loss terms, lr, grad norm, throughput)."""
        if self.trackers:
            self._log(step, {f"train/{k}": v for k, v in numbers(values).items()})

    def evaluation(self, step: int, task: str, metrics: dict[str, Any] | None) -> None:
        """One task's evaluation at `step` (a point of its curve)."""
        if self.trackers and metrics:
            self._log(step, {f"eval/{task}/{k}": v for k, v in numbers(metrics).items()})

    def end(
        self,
        status: str,
        final_terms: dict[str, Any],
        results: dict[str, Any],
        config: dict[str, Any],
    ) -> None:
        """The run's status, its final loss terms and final suite results ({TASK/METRIC:
        value}), and its final config."""
        if not self.trackers:
            return
        summary = {f"final/train/{k}": v for k, v in numbers(final_terms).items()}
        summary.update({f"final/eval/{k}": v for k, v in numbers(results).items()})
        for t in self.trackers:
            t.end(status, summary, config)

    def close(self) -> None:
        """Close every backend; one that fails to close is a warning (the run's status is
        recorded already: a tracker must not change it)."""
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            try:
                t.close()
            except Exception as e:
                print(f"warning: closing {type(t).__name__} failed: {e}", file=sys.stderr)
