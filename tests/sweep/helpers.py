"""Shared by the sweep tests: tiny specs and a stand-in for run_unlearning."""

from __future__ import annotations

from pathlib import Path

import yaml

from unlearn.runs.rows import RunMeta, utc_now
from unlearn.runs.rundir import RunDir

TINY = {
    "num_train_examples": 8,
    "pdbs": 2,
    "grad_accum": 1,
    "max_steps": 2,
    "progress": False,
}


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def base_spec(world, **extra) -> dict:
    return {
        "name": "s",
        "world": str(world.root),
        "method": "sequential",
        "base": dict(TINY),
        "grid": {"retain_coef": [1, 5]},
        **extra,
    }


def fake_run(calls: list[str], fail=(), interrupt=()):
    """A stand-in for run_unlearning that writes a finished run dir in milliseconds.
    `fail`/`interrupt` are retain_coef values that raise RuntimeError / get killed mid-run."""

    def run(cfg, monitor=None):
        pid, coef = cfg.args.run_id, cfg.method.retain_coef
        calls.append(pid)
        run_dir = RunDir(cfg.args.out)
        run_dir.write_run(RunMeta(pid, "unlearn", cfg.args.method, status="running"))
        if coef in interrupt:  # a kill: the run never gets to record anything
            raise KeyboardInterrupt
        if coef in fail:
            run_dir.update(status="failed", error="RuntimeError: boom", finished=utc_now())
            raise RuntimeError("boom")
        run_dir.append_eval(2, "forget", {"acc": 0.25})
        run_dir.append_eval(2, "retain", {"acc": 0.5 + coef / 100})
        # The world's other retain tasks, kept: the retain minimum is the retain task's.
        for task in ("retain_late", "near_domain"):
            run_dir.append_eval(2, task, {"acc": 0.99})
        return run_dir.update(status="done", finished=utc_now())

    return run
