"""Sweep points: one combination of a spec's values -> a validated `Point`, and its id.

Design choices:
- A point's id is readable (method + the values the point varies) plus a hash of everything
  that defines it (method, every override, the world's preset and seed). The same spec always
  gives the same ids and run directories, which is what makes resume work; a changed base value
  gives new ids, so results of a different configuration are never mistaken for this one's.
- A Point is plain data (configs and paths, picklable): a cluster executor ships it to a job.
- Building a point builds its run and attack configs (the builders reject unknown fields and bad
  values); models are validated once per distinct combination of what they depend on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from unlearn.data import CorpusSpec
from unlearn.errors import UsageError
from unlearn.models import ModelRef, check_lora_targets
from unlearn.recipes.attack import AttackConfig, build_attack_config
from unlearn.recipes.unlearning import RunConfig, build_run_config, validate
from unlearn.world import World

UNHASHED_FIELDS = ("progress", "checkpoint_every")
"""Fields that cannot change a result, so they do not change a point's id."""
ABBREVIATIONS = {
    "retain_coef": "rc",
    "remove_coef": "rm",
    "num_train_examples": "n",
    "max_steps": "steps",
    "epochs": "ep",
    "grad_accum": "ga",
    "lora_r": "r",
    "layers": "L",
    "optimizer": "",
}
"""Short names in point ids (the seeds' tables say rc/rm); other fields keep their name."""


@dataclasses.dataclass
class Point:
    """One unlearning run of a sweep (+ its attack), fully configured and validated."""

    id: str
    method: str
    overrides: dict[str, Any]
    """The run's fields as the spec sets them (base, then this point's values)."""
    varied: dict[str, Any]
    """The values this point varies (from grid/points), in spec order."""
    run_dir: Path
    run_config: RunConfig
    attack_dir: Path | None = None
    attack_config: AttackConfig | None = None


def build_point(
    method: str,
    label: str,
    overrides: dict,
    varied: dict,
    attack: dict | None,
    world: World,
    out: Path,
    store: Path,
) -> Point:
    """The point of `method` with these (typed) overrides, its run and attack configs built;
    `label` names the spec block in errors."""
    pid = point_id(method, overrides, varied, f"{world.preset}-{world.seed}")
    where = f"{label}, point {pid}"
    run_dir = out / pid
    try:
        run_config = build_run_config(
            method,
            {
                **overrides,
                "world": str(world.root),
                "out": str(run_dir),
                "run_id": pid,
                "store": str(store),
            },
        )
        point = Point(pid, method, overrides, varied, run_dir, run_config)
        if attack is not None:
            _attach_attack(point, attack, world, out, store)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    return point


def _attach_attack(point: Point, attack: dict, world: World, out: Path, store: Path) -> None:
    lora = point.run_config.lora
    if lora.lora and not lora.merge:
        raise UsageError("the attack needs the merged model: set merge: true (or lora: false)")
    point.attack_dir = out / f"{point.id}-attack"
    point.attack_config = build_attack_config(
        {
            **attack,
            "model": str(point.run_dir / "model"),
            "out": str(point.attack_dir),
            "world": str(world.root),
            "parent": point.id,
            "run_id": f"{point.id}-attack",
            "store": str(store),
        }
    )
    args = point.attack_config.args
    unknown = sorted(set(args.eval_tasks) - set(world.questions))
    if unknown:
        raise UsageError(f"unknown attack eval task(s) {unknown}; have {sorted(world.questions)}")
    if args.corpus is not None:
        spec = CorpusSpec.parse(args.corpus)
        if spec.is_local and not Path(spec.source).is_file():
            raise UsageError(f"attack corpus {args.corpus} not found")


def validate_models(points: list[Point]) -> None:
    """`validate` (world, model config, layers, corpora, LoRA targets) once per distinct
    combination; an attack's LoRA targets are checked against the run's model (the attacked
    model is the run's output, which does not exist yet and has the same modules)."""
    models: dict[str, ModelRef] = {}
    for p in points:
        a, lora = p.run_config.args, p.run_config.lora
        key = json.dumps(
            [a.method, a.model_args.model, a.model_args.revision, a.forget_corpus,
             a.retain_corpus, a.retain_mix,
             p.run_config.method.layers, p.run_config.method.retain_layers,
             getattr(p.run_config.method, "lens", None),
             lora.lora and lora.lora_target_modules]
        )  # fmt: skip
        try:
            if key not in models:
                models[key] = validate(p.run_config).model_ref
            attack = p.attack_config
            if attack is not None and attack.lora.lora:
                check_lora_targets(models[key], attack.lora.lora_target_modules)
        except UsageError as e:
            raise UsageError(f"point {p.id}: {e}") from None


def point_id(method: str, overrides: dict, varied: dict, world: str) -> str:
    """`<method>-<short name><value>...-<hash6>`, e.g. `lens-rc5-rm20-3fa2c1`.

    The readable part names the values the point varies; the hash covers the method, every
    override and the world, so two points differ in id exactly when they differ in config.
    """
    canon = {"method": method, "world": world, "overrides": _hashed(overrides)}
    digest = hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()[:6]
    parts = [
        ABBREVIATIONS.get(k, k) + _id_value(v)
        for k, v in varied.items()
        if k not in UNHASHED_FIELDS
    ]
    return "-".join([method, *parts, digest])


def check_distinct(points: list[Point]) -> None:
    """Two points of one configuration (`5` and `5.0` in a grid, two equal entries under points)
    would share a run directory: a spec error, not a silent duplicate."""
    seen: dict[str, str] = {}
    for p in points:
        config = json.dumps([p.method, _hashed(p.overrides)], sort_keys=True)
        if config in seen:
            raise UsageError(f"points {seen[config]} and {p.id} have the same configuration")
        seen[config] = p.id


def _hashed(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if k not in UNHASHED_FIELDS}


def _id_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ".".join(_id_value(v) for v in value)
    if value is None:
        return "none"
    # Paths or names: keep them short and free of path separators.
    return re.sub(r"[^A-Za-z0-9.+]+", "_", str(value)).strip("_")[-24:]
