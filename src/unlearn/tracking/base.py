"""Experiment tracking: the settings (`TrackingArgs`) and the interface every backend
implements (`Tracker`); `tracking.reporter` names the values and fans them out.

Design choices:
- The run directory stays the source of truth; a tracker gets a copy of what the run records,
  under one naming scheme for every backend (`tracking.reporter`).
- Settings are operational, like --progress: no run config (run.json, resume checks, sweep
  point ids) contains them, so reporting a run never changes which run it is.
- A backend's library is optional (`pip install unlearn[wandb]`) and imported only when a run
  opens; one asked for but not installed is bad input, found when the flags are parsed (before
  any weights load), as is an unknown name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Any

from unlearn.errors import UsageError

BACKENDS = ("wandb", "tensorboard")
PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}
"""The Python package each backend needs (the extra of the same name installs it)."""
_PROJECT = re.compile(r"[^/\\#?%:]+")
"""W&B refuses these characters in a project name (and TensorBoard makes it a folder)."""


def installed(package: str) -> bool:
    """Whether `package` can be imported, without importing it (wandb takes a second)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


@dataclasses.dataclass
class TrackingArgs:
    """Experiment tracking (docs/tracking.md): operational, never part of a run's config."""

    report_to: str = "none"
    """Trackers to report to: none, wandb or tensorboard (both: wandb,tensorboard). Optional
    packages: pip install 'unlearn[wandb]' / 'unlearn[tensorboard]'; WANDB_MODE=offline
    works without a network."""
    project: str = "unlearn"
    """The tracker's project (W&B project; TensorBoard: a folder under --tracking_dir)."""
    run_name: str | None = None
    """The run's name in the tracker (default: its run id)."""
    group: str | None = None
    """A group of related runs (default: the sweep's or search's name for their runs, the
    robustness run's id for its attacks and probes)."""
    tags: list[str] = dataclasses.field(default_factory=list)
    """Tags of the run (W&B tags; TensorBoard: in the config text)."""
    tracking_dir: str | None = None
    """Where the trackers write their local files: TensorBoard's events in
    DIR/PROJECT/[GROUP/]RUN_NAME, W&B's run folders in DIR/wandb. Default: each run's own
    directory (OUT/tensorboard; OUT/wandb unless WANDB_DIR is set)."""

    def __post_init__(self) -> None:
        names = [n.strip() for n in self.report_to.split(",")] if self.report_to else [""]
        choices = ("none", *BACKENDS)
        for name in names:
            if name not in choices:
                raise UsageError(f"unknown --report_to {name!r} (choose from {', '.join(choices)})")
        if "none" in names and len(names) > 1:
            raise UsageError(f"--report_to none reports nowhere; got {self.report_to!r}")
        if len(set(names)) < len(names):
            raise UsageError(f"--report_to names a tracker twice: {self.report_to!r}")
        for name in self.backends:
            if not installed(PACKAGES[name]):
                raise UsageError(
                    f"--report_to {name} needs the {PACKAGES[name]} package, not installed:"
                    f" pip install 'unlearn[{name}]'"
                )
        if not _PROJECT.fullmatch(self.project):
            raise UsageError(f"--project must be a name without / \\ # ? % :, got {self.project!r}")
        for name in ("run_name", "group"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise UsageError(f"--{name} must not be empty")
        if any(not t.strip() for t in self.tags):
            raise UsageError("--tags must not be empty")

    @property
    def backends(self) -> tuple[str, ...]:
        """The trackers named (none for report_to none)."""
        return tuple(n.strip() for n in self.report_to.split(",") if n.strip() != "none")

    @property
    def enabled(self) -> bool:
        return bool(self.backends)


TRACKING_FIELDS = tuple(f.name for f in dataclasses.fields(TrackingArgs))
"""The flat names of `TrackingArgs`: set on a command line (or a run's --config file), never
in a sweep or search spec (the command sets them on each of its runs)."""


@dataclasses.dataclass
class RunInfo:
    """What a tracker is told about the run it follows when it opens."""

    id: str
    kind: str
    out: Path
    """The run directory (the default home of the trackers' files)."""
    config: dict[str, Any]
    """The run's config (run.json's), with its kind, method and parent."""
    started: str | None = None
    resume_step: int = 0
    """The first step this process may record (0: a fresh run; a resumed run records from
    the step after its checkpoint): a tracker hides what an earlier attempt recorded from it."""

    @property
    def tracker_id(self) -> str:
        """A stable id for one run (directory, run id, start time): a resumed run continues
        its tracker run, a fresh run in the same directory starts a new one."""
        key = f"{self.out.absolute()}|{self.id}|{self.started}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]


class Tracker:
    """A backend: gets flat {name: number} rows and the summary, in the run's order."""

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def end(self, status: str, summary: dict[str, float], config: dict[str, Any]) -> None:
        """The run ended with `status`; `summary` holds the final numbers (final/...)."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release (W&B: finish the run). Called once, whatever ended the run."""
        raise NotImplementedError


STDERR_SUFFIX = "_stderr"


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of `values`: a failed evaluation's None, a text value and a metric's
    standard error (NAME_stderr: in evals.jsonl beside its metric) are not plotted."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and not k.endswith(STDERR_SUFFIX)
    }


def for_group(args: TrackingArgs, group: str, keep_name: bool = False) -> TrackingArgs:
    """`args` for one of several runs reported together (a sweep's points, a robustness run's
    attacks and probes): in `group` unless --group names one, each named by its own run id
    (`keep_name`: the run --run_name names, e.g. the robustness run leading its group)."""
    name = args.run_name if keep_name else None
    return dataclasses.replace(args, group=args.group or group, run_name=name)


def for_many(args: TrackingArgs, group: str, what: str) -> TrackingArgs | None:
    """The tracking of every run of a command that starts many (`what`: sweep, search): in
    `group` (its name) unless --group names one, each named by its run id; None when off.
    --run_name names one run, so it is bad input here."""
    if args.run_name is not None:
        raise UsageError(
            f"--run_name names one run; a {what}'s runs are named by their run ids"
            " (--group names their group)"
        )
    return for_group(args, group) if args.enabled else None
