"""Weights & Biases: one W&B run per run (`pip install unlearn[wandb]`).

Design choices:
- W&B's own settings decide where the data goes: WANDB_MODE=offline writes the run under
  DIR/wandb/offline-run-* with no network (`wandb sync` uploads it later), WANDB_API_KEY /
  `wandb login` and WANDB_ENTITY as usual. Nothing here reads a credential.
- Several runs may be open in one process (a robustness run reports while its attacks report
  theirs; a sweep runs points one after another): each is its own W&B run object
  (reinit="create_new"), never the global `wandb.run`.
- The W&B run id is stable for one run (`RunInfo.tracker_id`), so a run resumed from its
  checkpoint continues its W&B run (resume="allow") and a fresh run in the same directory
  starts another.
- The console is left alone (console="off"): the command's own output is what it prints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from unlearn.tracking.base import RunInfo, Tracker, TrackingArgs

SUCCESS = ("done", "collapsed", "pruned")
"""Statuses W&B shows as finished (any other as failed; the status itself is in the
summary)."""


class WandbTracker(Tracker):
    def __init__(self, args: TrackingArgs, run: RunInfo) -> None:
        import wandb

        directory = Path(args.tracking_dir or os.environ.get("WANDB_DIR") or run.out)
        directory.mkdir(parents=True, exist_ok=True)
        self.exit_code = 1  # until the run says how it ended
        self.run = wandb.init(
            project=args.project,
            name=args.run_name or run.id,
            group=args.group,
            tags=list(args.tags) or None,
            job_type=run.kind,
            config=run.config,
            dir=str(directory),
            id=run.tracker_id,
            resume="allow",
            reinit="create_new",
            settings=wandb.Settings(console="off", disable_git=True, save_code=False),
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        # Values logged at one step (a row of metrics, then that step's evaluations) are
        # merged by W&B into one history row.
        self.run.log(values, step=step)

    def end(self, status: str, summary: dict[str, float], config: dict[str, Any]) -> None:
        # The final config may hold what the run resolved while it ran (a method's layers).
        self.run.config.update(config, allow_val_change=True)
        self.run.summary.update({**summary, "status": status})
        self.exit_code = 0 if status in SUCCESS else 1

    def close(self) -> None:
        self.run.finish(exit_code=self.exit_code)
