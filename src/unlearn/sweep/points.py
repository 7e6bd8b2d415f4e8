"""Sweep points: one combination of a spec's values -> a validated `Point`, and its id.

Design choices:
- A point's id is readable (method + the values the point varies) plus a hash of everything
  that defines it (method, every override, the world's preset and seed). The same spec always
  gives the same ids and run directories, which is what makes resume work; a changed base value
  gives new ids, so results of a different configuration are never mistaken for this one's.
- A Point is plain data (configs and paths, picklable): a cluster executor ships it to a job.
- Building a point builds its run and attack configs (the builders reject unknown fields and bad
  values); models are validated once per distinct combination of what they depend on. Hub models
  and corpora are checked only when `check_hub` (a dry run validates offline).
- A spec's baselines are points too (`Point.baseline`): one evaluation run each, so executors,
  --status, the store and the tables treat them like any point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearn.config.settings import OPERATIONAL_FIELDS, ModelArgs
from unlearn.data import CorpusSpec
from unlearn.errors import UsageError
from unlearn.eval.suite import SuiteArgs, resolve_suite
from unlearn.models.lora import check_lora_targets
from unlearn.models.refs import ModelRef
from unlearn.recipes.attack import AttackConfig, build_attack_config
from unlearn.recipes.unlearning import RunConfig, build_run_config, validate
from unlearn.tracking import TrackingArgs
from unlearn.world import World

if TYPE_CHECKING:
    from unlearn.recipes.distill import DistillConfig
    from unlearn.robustness.plan import RobustnessPlan

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
"""Short names in point ids (the reference campaign's tables say rc/rm); other fields keep their
name."""


BASELINE = "baseline"
"""The method name of a baseline point."""


@dataclasses.dataclass
class Baseline:
    """A model the spec declares as a baseline: evaluated once with the suite, not trained."""

    label: str
    """Its name in tables ("Target model (to unlearn)")."""
    model_args: ModelArgs
    role: str | None = None
    """target, checkpoint, ignorant or filtered (orders rows; the target is the tamper table's
    original model)."""
    suite: SuiteArgs = dataclasses.field(default_factory=SuiteArgs)
    world: str | None = None
    store: str | None = None
    eval_batch_size: int = 64


@dataclasses.dataclass
class Point:
    """One unlearning run of a sweep (+ its attack), or one baseline, configured and validated."""

    id: str
    method: str
    overrides: dict[str, Any]
    """The run's fields as the spec sets them (base, then this point's values)."""
    varied: dict[str, Any]
    """The values this point varies (from grid/points), in spec order."""
    run_dir: Path
    run_config: RunConfig | None
    """None for a baseline."""
    attack_dir: Path | None = None
    attack_config: AttackConfig | None = None
    forget_task: str = "forget"
    """The suite's first forget task: the "forget" of progress lines and sweep tables."""
    retain_tasks: tuple[str, ...] = ("retain",)
    """The suite's retain tasks: their minimum is the "retain" of progress lines, sweep tables
    and the demo's choice of a best run (`report.analysis.retain_aggregate`); each is shown."""
    baseline: Baseline | None = None
    distill: DistillConfig | None = None
    """The spec's `distill:` block for this point: UNDO on its model once it is done."""
    robustness: RobustnessPlan | None = None
    """The spec's `robustness:` suite, run on the point's model once it is done."""
    tracking: TrackingArgs | None = None
    """The experiment trackers its runs report to (`track`; never part of its config or id)."""

    @property
    def distill_dir(self) -> Path:
        return self.run_dir.parent / f"{self.id}-distill"

    @property
    def robustness_dir(self) -> Path:
        return self.run_dir.parent / f"{self.id}-robustness"


def build_point(
    method: str,
    label: str,
    overrides: dict,
    varied: dict,
    attack: dict | None,
    world: World | None,
    out: Path,
    store: Path,
) -> Point:
    """The point of `method` with these (typed) overrides, its run and attack configs built;
    `label` names the spec block in errors."""
    pid = point_id(method, overrides, varied, world_tag(world))
    where = f"{label}, point {pid}"
    run_dir = out / pid
    placed = {"out": str(run_dir), "run_id": pid, "store": str(store)}
    if world is not None:
        placed["world"] = str(world.root)
    try:
        run_config = build_run_config(method, {**overrides, **placed})
        suite = resolve_suite(run_config.args.suite, world)
        point = Point(
            pid, method, overrides, varied, run_dir, run_config,
            forget_task=suite.forget[0], retain_tasks=tuple(suite.retain),
        )  # fmt: skip
        if attack is not None:
            _attach_attack(point, attack, world, out, store)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    return point


def world_tag(world: World | None) -> str:
    """What a point id hashes of the world: its preset and seed ("none" without a world)."""
    return f"{world.preset}-{world.seed}" if world is not None else "none"


def track(point: Point, tracking: TrackingArgs) -> Point:
    """Report every run of `point` (its unlearning, attack, distillation, robustness suite, or
    its baseline evaluation) with `tracking`, a sweep's or search's trackers, grouped
    (`unlearn.tracking.for_group`). Operational: the point's configs and id do not change."""
    point.tracking = tracking
    for cfg in (point.run_config, point.attack_config, point.distill):
        if cfg is not None:
            cfg.args.tracking = tracking
    return point


def build_baseline(baseline: Baseline, world: World | None, out: Path) -> Point:
    """The point that evaluates one declared baseline (its id hashes model, revision, suite)."""
    fields = {
        "model": baseline.model_args.model,
        "revision": baseline.model_args.revision,
        "role": baseline.role,
        "suite": dataclasses.asdict(baseline.suite),
    }
    # `baseline-target-3fa2c1`: the role (else the label) and a hash of what defines it.
    digest = point_id(BASELINE, fields, {}, world_tag(world)).rsplit("-", 1)[1]
    pid = f"{BASELINE}-{_id_value(baseline.role or baseline.label)}-{digest}"
    suite = resolve_suite(baseline.suite, world)
    return Point(
        pid, BASELINE, fields, {}, out / pid, None,
        forget_task=suite.forget[0], retain_tasks=tuple(suite.retain), baseline=baseline,
    )  # fmt: skip


def _attach_attack(point: Point, attack: dict, world: World | None, out: Path, store: Path) -> None:
    lora = point.run_config.lora
    if lora.lora and not lora.merge:
        raise UsageError("the attack needs the merged model: set merge: true (or lora: false)")
    point.attack_dir = out / f"{point.id}-attack"
    placed = {
        "model": str(point.run_dir / "model"),
        "out": str(point.attack_dir),
        "parent": point.id,
        "run_id": f"{point.id}-attack",
        "store": str(store),
    }
    if world is not None:
        placed["world"] = str(world.root)
    point.attack_config = build_attack_config({**attack, **placed})
    args = point.attack_config.args
    resolve_suite(args.suite, world)  # names and question files, before anything runs
    if args.corpus is not None:
        spec = CorpusSpec.parse(args.corpus)
        if spec.is_local and not Path(spec.source).is_file():
            raise UsageError(f"attack corpus {args.corpus} not found")


def _on_hub(name: str | None, corpus: bool = False) -> bool:
    """Whether a model or corpus name is a hub id (no local file or directory)."""
    if name is None:
        return False
    if corpus:
        return not CorpusSpec.parse(name).is_local
    return not Path(name).expanduser().exists()


def validate_models(points: list[Point], check_hub: bool = True) -> None:
    """`validate` (world, model config, layers, corpora, LoRA targets) once per distinct
    combination; an attack's LoRA targets are checked against the run's model (the attacked
    model is the run's output, which does not exist yet and has the same modules). Without
    `check_hub`, points whose model or corpora are on the hub are not checked here (a dry run
    validates offline; the run checks them before it trains)."""
    models: dict[str, ModelRef] = {}
    for p in points:
        if p.run_config is None:
            ref = p.baseline.model_args
            if check_hub or not _on_hub(ref.model):
                try:
                    ref.resolve()
                except UsageError as e:
                    raise UsageError(f"baseline {p.baseline.label!r}: {e}") from None
            continue
        a, lora = p.run_config.args, p.run_config.lora
        remote = _on_hub(a.model_args.model) or any(
            _on_hub(c, corpus=True) for c in (a.forget_corpus, a.retain_corpus, a.retain_mix)
        )
        if remote and not check_hub:
            continue
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
        if k not in OPERATIONAL_FIELDS
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
    return {k: v for k, v in overrides.items() if k not in OPERATIONAL_FIELDS}


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
