"""The child runs of a robustness run (its attacks and probes): whether one already finished
with a given configuration, and why one has no result. Shared by the fine-tuning attacks and
probes (`per_model`) and the attacks that change no stored weight (`weightless`)."""

from __future__ import annotations

import json
from pathlib import Path

from unlearn.errors import UsageError
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RunDir


def finished_run(run_dir: Path, config: dict | None = None) -> RunMeta | None:
    """The run in `run_dir` if it ended (not running or preempted) with this config."""
    if not RunDir(run_dir).exists():
        return None
    try:
        meta = RunDir(run_dir).read_meta()
    except UsageError:
        return None
    if meta.status in ("running", "pending", "preempted"):
        return None
    if config is not None and meta.status == "failed":
        return None  # an attack or probe that failed is tried again (a diverged one is a result)
    if config is not None:
        stored = {k: v for k, v in meta.config.items() if k != "suite"}
        if stored != json.loads(json.dumps(config)):
            return None
    return meta


def run_error(run_dir: Path, meta: RunMeta) -> str | None:
    """Why a run has no result: its own error, else its first failed evaluation's."""
    if meta.error:
        return meta.error
    failed = [e for e in RunDir(run_dir).read().evals if e.status == "failed"]
    return f"evaluation of {failed[0].task} failed: {failed[0].error}" if failed else None
