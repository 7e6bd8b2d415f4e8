"""The campaign the seeds run by hand, as one function: baselines -> unlearning sweeps -> attack the
best run of each method (and the filtered twin and the original target, as reference curves) ->
report. `unlearn demo` runs it on the mini world; every stage resumes from its run directories.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from unlearn.config import ModelArgs
from unlearn.eval.suite import SuiteArgs
from unlearn.recipes.attack import build_attack_config, run_attack
from unlearn.recipes.baseline import run_baseline
from unlearn.runs.rundir import RunDir

BASELINES = (("target", "Target (to unlearn)"), ("ignorant", "Ignorant checkpoint (source)"),
             ("filtered", "Filtered twin (gold standard)"))  # fmt: skip


def baseline_runs(world, runs_dir: Path, store_path: Path, log: Callable[[str], None]) -> dict:
    """Evaluate the world's target, ignorant checkpoint and filtered twin as baseline runs."""
    paths = {"target": world.target, "ignorant": world.ignorant_checkpoint,
             "filtered": world.filtered}  # fmt: skip
    metas = {}
    for role, name in BASELINES:
        path = runs_dir / f"baseline-{role}"
        if RunDir(path).exists() and RunDir(path).read_meta().status == "done":
            metas[role] = RunDir(path).read_meta()
            continue
        metas[role] = run_baseline(
            name, ModelArgs(str(paths[role])), SuiteArgs(), path, role, world.root, store_path
        )
        log(f"baseline {name}: {metas[role].status}")
    return metas


def final_acc(run_dir: Path, task: str) -> float | None:
    """Latest accuracy of `task` in a run directory (None if missing or failed)."""
    rows = [e for e in RunDir(run_dir).read().evals if e.task == task and e.metric == "acc"]
    if not rows:
        return None
    last = max(rows, key=lambda e: e.step)
    return last.value if last.status == "done" else None


def best_point(states, retain_floor: float):
    """The done point with the lowest forget accuracy whose retain accuracy is >= the floor."""
    candidates = [
        (s.forget, -s.retain, s.id, s)
        for s in states
        if s.status == "done"
        and isinstance(s.forget, float)
        and isinstance(s.retain, float)
        and s.retain >= retain_floor
    ]
    return min(candidates)[3] if candidates else None


def write_spec(path: Path, world: Path, sweeps: list[dict], name: str) -> Path:
    spec = {"name": name, "world": str(world), "out": str(path.parent / "runs"),
            "store": str(path.parent / "store.sqlite"), "sweeps": sweeps}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def attack_runs(
    targets: dict[str, tuple[str, str | None]],
    world,
    runs_dir: Path,
    store_path: Path,
    attack_overrides: dict,
    log: Callable[[str], None],
) -> None:
    """Attack each model {label: (model path, parent run id)} unless its attack is already done."""

    for label, (model, parent) in targets.items():
        out = runs_dir / f"attack-{label}"
        if RunDir(out).exists() and RunDir(out).read_meta().status == "done":
            log(f"attack {label}: done earlier")
            continue
        cfg = build_attack_config({
            **attack_overrides, "model": model, "world": str(world.root), "out": str(out),
            "parent": parent, "run_id": f"attack-{label}", "store": str(store_path),
            "progress": False,
        })  # fmt: skip
        meta = run_attack(cfg)
        log(f"attack {label}: {meta.status}")


def print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
