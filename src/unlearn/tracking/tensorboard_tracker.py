"""TensorBoard: event files written by `torch.utils.tensorboard.SummaryWriter` (`pip install
unlearn[tensorboard]`).

Design choices:
- Where: OUT/tensorboard by default, so `tensorboard --logdir` at a sweep's or search's out
  shows every run of it; with --tracking_dir DIR, DIR/PROJECT/[GROUP/]RUN_NAME, so a project
  is one folder whatever the run directories.
- An earlier attempt's events in the same folder are hidden with TensorBoard's own purge
  (SummaryWriter's purge_step): from step 0 for a fresh run, from the first step this process
  records for a resumed one, so a curve never mixes two attempts.
- The config (and the tags) is a text entry; at the end the final numbers are scalars at the
  last step and, with the config, an HParams session, so the HParams dashboard compares the
  runs of a sweep or search side by side.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from unlearn.tracking.base import RunInfo, Tracker, TrackingArgs


def _folder(name: str) -> str:
    """A name as one folder (no separators, never `.` or `..`)."""
    cleaned = re.sub(r"[/\\]+", "_", name).strip()
    return cleaned if cleaned not in ("", ".", "..") else "_"


def log_dir(args: TrackingArgs, run: RunInfo) -> Path:
    """The folder of this run's event files."""
    if args.tracking_dir is None:
        return run.out / "tensorboard"
    parts = [args.project, *([args.group] if args.group else []), args.run_name or run.id]
    return Path(args.tracking_dir).joinpath(*map(_folder, parts))


def _hparam(value: Any) -> Any:
    """A config value as TensorBoard's HParams accept it (a number, a string or a bool)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


class TensorBoardTracker(Tracker):
    def __init__(self, args: TrackingArgs, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir(args, run)), purge_step=run.resume_step)
        self.last_step = run.resume_step
        self.config = dict(run.config)
        text = json.dumps({**run.config, "tags": list(args.tags)}, indent=2, default=str)
        # Indented: TensorBoard renders text entries as markdown (a code block keeps the JSON).
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.last_step = max(self.last_step, step)
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def end(self, status: str, summary: dict[str, float], config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for name, value in summary.items():
            self.writer.add_scalar(name, value, self.last_step)
        self.writer.add_text("status", status, self.last_step)
        params = {k: _hparam(v) for k, v in {**config, "status": status}.items() if v is not None}
        # SummaryWriter.add_hparams would write them into a new sub-folder (another "run" in
        # TensorBoard's eyes); written with this run's writer they belong to this run.
        for proto in hparams(params, summary):
            self.writer.file_writer.add_summary(proto, self.last_step)

    def close(self) -> None:
        self.writer.close()  # flushes
