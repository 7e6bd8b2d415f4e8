"""Shared by the search tests: tiny specs and fast stand-ins for the runs a search starts."""

from __future__ import annotations

from pathlib import Path

import yaml

from unlearn.errors import Pruned
from unlearn.eval.split import split_entry, with_part
from unlearn.runs.rows import RunMeta, utc_now
from unlearn.runs.rundir import RunDir

TINY = {"num_train_examples": 8, "pdbs": 2, "grad_accum": 1, "max_steps": 2, "progress": False}
REFERENCE = 0.96
"""The stand-in target's accuracy on every retain task."""
RETAIN_TASKS = ("retain", "retain_late", "near_domain")
REPORT_SHIFT = 0.01
"""What the stand-ins add to an accuracy on a task's report part (its selection part: none)."""


def keys(suite, role: str) -> list[str]:
    """The eval keys of a suite's `role` tasks (world tasks: the name, its part kept); a suite
    naming none (a sweep's): the world's forget task, or its retain tasks."""
    out = []
    for entry in getattr(suite, f"{role}_tasks") or (
        ["forget"] if role == "forget" else list(RETAIN_TASKS)
    ):
        whole, part = split_entry(entry)
        name = whole.rpartition("@")[0] or whole
        out.append(with_part(name, part) if part else name)
    return out


def shifted(key: str, value: float) -> float:
    return value + REPORT_SHIFT if key.endswith("#report") else value


def spec(world, tmp_path: Path, **extra) -> dict:
    """A boundary search over sequential's retain_coef on the tiny world."""
    return {
        "name": "s",
        "world": str(world.root),
        "out": str(tmp_path / "out"),
        "method": "sequential",
        "base": dict(TINY),
        "space": {"retain_coef": {"float": [1, 20]}},
        "goal": "boundary",
        "budget": 4,
        "pruner": "none",
        **extra,
    }


def write(tmp_path: Path, spec: dict, name: str = "search.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def accuracies(retain_coef: float) -> tuple[float, float]:
    """The stand-in's (forget, retain): a higher retain_coef forgets less and keeps more; the
    constraint (retain >= REFERENCE - 0.02) holds from retain_coef 12.4 on."""
    return 0.3 + 0.6 * (retain_coef - 1) / 19, REFERENCE - 0.05 * (20 - retain_coef) / 19


def fake_baseline(label, model_args, suite_args, out, role=None, world=None, store=None,
                  batch_size=64, run_id=None, tracking=None):  # fmt: skip
    run_dir = RunDir(out)
    run_dir.write_run(RunMeta(run_id or Path(out).name, "baseline", config={"name": label,
                              "role": role}, status="running"))  # fmt: skip
    for key in keys(suite_args, "forget"):
        run_dir.append_eval(0, key, {"acc": shifted(key, 0.9 if role == "target" else 0.3)})
    for key in keys(suite_args, "retain"):
        run_dir.append_eval(0, key, {"acc": shifted(key, REFERENCE)})
    return run_dir.update(status="done", finished=utc_now())


def fake_run(calls: list, fail=lambda cfg: False, prune=lambda cfg: False):
    """A stand-in for run_unlearning(cfg, monitor): a finished run dir in milliseconds; `fail`
    raises, `prune` reports a bad intermediate value to the monitor (which may prune)."""

    def run(cfg, monitor=None):
        pid, coef = cfg.args.run_id, cfg.method.retain_coef
        calls.append(pid)
        run_dir = RunDir(cfg.args.out)
        run_dir.write_run(RunMeta(pid, "unlearn", cfg.args.method, status="running"))
        if fail(cfg):
            run_dir.update(status="failed", error="RuntimeError: boom", finished=utc_now())
            raise RuntimeError("boom")
        forget, retain = accuracies(coef)
        suite = cfg.args.suite
        if monitor is not None:
            bad = prune(cfg)
            accs = {**{k: 0.99 if bad else forget for k in keys(suite, "forget")},
                    **dict.fromkeys(keys(suite, "retain"), retain)}  # fmt: skip
            try:
                monitor.report(1, accs)
            except Pruned as e:
                return run_dir.update(status="pruned", error=str(e), finished=utc_now())
        for key in keys(suite, "forget"):
            run_dir.append_eval(2, key, {"acc": shifted(key, forget)})
        for key in keys(suite, "retain"):
            run_dir.append_eval(2, key, {"acc": shifted(key, retain)})
        return run_dir.update(status="done", finished=utc_now())

    return run


def patch_runs(monkeypatch, calls: list, **kw) -> None:
    import unlearn.sweep.execute as execute

    monkeypatch.setattr(execute, "run_unlearning", fake_run(calls, **kw))
    monkeypatch.setattr(execute, "run_baseline", fake_baseline)
