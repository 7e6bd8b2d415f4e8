"""Sweep specs: one YAML file -> a validated `Sweep` (its points and SLURM settings).

    sweep = load_sweep("ct.yaml")      # parse + validate everything; nothing is written

The format is documented in docs/sweeps.md.

Design choices:
- The whole spec is validated before anything runs or is written: every point's run and attack
  config is built (unknown fields, values of the wrong type, bad values raise UsageError) and its
  world, model and layers are checked (`unlearn.sweep.points`), so a typo in point 17 costs one
  line, not 16 wasted runs. The `slurm:` block is checked too, even for a local run.
- Values are typed here against the fields they set (ints become floats for float fields), so
  `5` and `5.0` are one configuration, one point id.
- Points are counted (product of the grid's list lengths) before any is built: a spec over
  MAX_POINTS is refused unless the caller raises the limit, since expansion holds them all.
- Reading a spec writes nothing: the out directory is only checked to be creatable.
- `world:` is optional: without it `base` names the model and corpora (local paths or hub ids)
  and the `attack:` block its corpus. Paths are relative to the spec file: a value of a path
  field (model, corpora, source, lens, affine, question files) that exists relative to the spec
  is made absolute; anything else is left as written (a hub id).
- The `eval:` block is the evaluation suite of every point, its attack and the baselines; the
  `baselines:` block names models evaluated once with it (points of their own, `sweep.points`).
- A dry run (`check_hub=False`) does not contact the hub: hub models, corpora and benchmark
  datasets are checked when the sweep runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearn.config.settings import coerce_values
from unlearn.config.yamlio import read_yaml
from unlearn.errors import UsageError
from unlearn.eval.suite import SuiteArgs
from unlearn.fsutil import check_output_dir
from unlearn.methods import get_method
from unlearn.recipes.attack import ATTACK_SECTIONS
from unlearn.recipes.distill import DISTILL_PLACED, build_distill_config
from unlearn.recipes.unlearning import run_sections
from unlearn.robustness.plan import plan_from_spec
from unlearn.runs.rundir import check_outside_inputs
from unlearn.runs.store import check_store
from unlearn.sweep.inputs import check_keys, eval_block, mapping, read_baselines, with_paths
from unlearn.sweep.points import (
    Point,
    build_baseline,
    build_point,
    check_distinct,
    validate_models,
)
from unlearn.tracking import TRACKING_FIELDS
from unlearn.world import World, load_world

TOP_KEYS = (
    "name", "world", "out", "store", "method", "base", "grid", "points", "attack", "sweeps",
    "slurm", "eval", "baselines", "robustness", "distill",
)  # fmt: skip

BLOCK_KEYS = ("method", "base", "grid", "points", "attack")
SWEEP_RUN_FIELDS = ("method", "world", "out", "run_id", "store", "eval")
"""Run fields the sweep sets itself (a spec setting them is an error, not silently ignored)."""
SWEEP_ATTACK_FIELDS = ("model", "world", "out", "run_id", "store", "parent")
MAX_POINTS = 1000
"""The most points a spec may expand to unless `--max_points` (load_sweep's max_points) says
otherwise: every point is built and validated up front, so a grid with one list too many (10^7
points) would otherwise fill the memory before a line is printed (docs/sweeps.md)."""


# -- reading the spec ---------------------------------------------------------------------------


@dataclasses.dataclass
class Sweep:
    """A validated sweep spec: where things go and every point."""

    name: str
    spec: Path
    world: Path | None
    out: Path
    store: Path
    points: list[Point]
    slurm: SlurmSettings | None = None
    """The spec's `slurm:` block (job resources for --executor slurm / submitit-local)."""


@dataclasses.dataclass
class MethodBlock:
    """One method's part of a spec (the top level itself, or one entry of `sweeps:`)."""

    label: str
    method: str
    base: dict[str, Any]
    grid: dict[str, list]
    points: list[dict[str, Any]]
    attack: dict[str, Any] | None


def load_sweep(path: str | Path, max_points: int = MAX_POINTS, check_hub: bool = True) -> Sweep:
    """Read, validate and expand a sweep spec (UsageError on anything wrong; writes nothing).
    A spec of more than `max_points` points is refused before any point is built; without
    `check_hub` nothing on the hub is checked (a dry run works offline)."""
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise UsageError(f"--max_points must be >= 1, got {max_points!r}")
    spec = Path(path).expanduser().absolute()
    raw = _read_yaml(spec)
    check_keys(raw, TOP_KEYS, "spec")
    name = raw.get("name", spec.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UsageError(
            f"spec: name must be a plain file name (letters, digits, ._-), got {name!r}"
        )
    world = load_world(spec_path(spec, raw["world"], "world")) if raw.get("world") else None
    out = spec_path(spec, raw["out"], "out") if raw.get("out") is not None else spec.parent / name
    store = (
        spec_path(spec, raw["store"], "store")
        if raw.get("store") is not None
        else out / "store.sqlite"
    )
    check_can_create(out, "out")
    if store.is_dir():
        raise UsageError(f"spec: store {store} is a directory, not a SQLite file")
    check_store(store)  # a foreign or corrupt file: refused before any point runs

    suite = eval_block(raw.get("eval"), spec.parent)
    blocks = _blocks(raw, spec.parent, suite)
    baselines = read_baselines(raw.get("baselines"), spec.parent, suite, world, store)
    count = sum(_count(block) for block in blocks) + len(baselines)
    if count > max_points:
        raise UsageError(
            f"spec: {count:,} points is more than the limit of {max_points:,}"
            " (check the grid; --max_points N raises the limit)"
        )
    points = [build_baseline(b, world, out) for b in baselines]
    for block in blocks:
        points += _expand(block, world, out, store)
    check_distinct(points)
    validate_models(points, check_hub)
    plan = plan_from_spec(raw.get("robustness"), spec.parent, world, SuiteArgs(**suite))
    distill = raw.get("distill")
    for point in points:
        if point.baseline is None and plan is not None:
            _needs_merged_model(point)
            point.robustness = plan
        if point.baseline is None and distill is not None:
            point.distill = _distill_config(distill, point, world, store)
    slurm = SlurmSettings.from_spec(raw.get("slurm"))
    return Sweep(name, spec, world.root if world else None, out, store, points, slurm)


def _distill_config(value: Any, point: Point, world: World | None, store: Path):
    """The `distill:` block as the point's DistillConfig (its teacher: the point's run)."""
    block = {} if value is True else mapping(value, "distill")
    placed = sorted(k for k in block if k in (*DISTILL_PLACED, *TRACKING_FIELDS))
    if placed:
        raise UsageError(f"distill: {', '.join(placed)} set by the sweep itself, remove them")
    _needs_merged_model(point)
    fields = {**block, "teacher": str(point.run_dir), "out": str(point.distill_dir),
              "run_id": f"{point.id}-distill", "store": str(store), "progress": False}  # fmt: skip
    if world is not None:
        fields["world"] = str(world.root)
    return build_distill_config(fields, "distill")


def _needs_merged_model(point: Point) -> None:
    lora = point.run_config.lora
    if lora.lora and not lora.merge:
        raise UsageError(f"point {point.id}: robustness: needs the merged model: set merge: true")


def _read_yaml(path: Path) -> dict:
    raw = read_yaml(path, "sweep spec")
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a sweep spec is a YAML mapping (name:, world:, method:, ...)")
    return raw


def spec_path(spec: Path, value: Any, key: str) -> Path:
    """A path from the spec; relative paths resolve against the spec file's directory."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"spec: {key} must be a path, got {value!r}")
    p = Path(value).expanduser()
    # Normalised ("runs/x", not "examples/../runs/x"): paths are shown in listings and tables.
    return Path(os.path.normpath(p if p.is_absolute() else spec.parent / p))


def check_can_create(path: Path, key: str) -> None:
    """`path` is a directory or can become one (checked without creating anything)."""
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"spec: {key} {path} exists and is not a directory")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"spec: {key} {path} cannot be created ({parent} is not writable)")


LOCK_FILE = ".sweep.lock"
"""The lock one live sweep or search holds on its OUT; it also says which of the two owns OUT."""
OUT_KINDS = ("sweep", "search")


def out_kind(out: Path) -> str | None:
    """Whether `out` is a sweep's or a search's output directory (its lock file says; one
    written before the lock recorded it: a search's has a study journal), None when neither."""
    lock = out / LOCK_FILE
    if not lock.is_file():
        return None
    kind = lock.read_text(encoding="utf-8", errors="replace").strip()
    if kind in OUT_KINDS:
        return kind
    return "search" if (out / "study.journal").exists() else "sweep"


def input_models(points: Sequence[Point], world: World | None) -> dict[str, str]:
    """{path or hub id: what it is} of every model the points read (a world's three included)."""
    models: dict[str, str] = {}
    if world is not None:
        for name, path in (("target", world.target), ("checkpoint", world.ignorant_checkpoint),
                           ("filtered twin", world.filtered)):  # fmt: skip
            models[str(path)] = f"world's {name} model"
    for p in points:
        if p.run_config is None:
            models.setdefault(str(p.baseline.model_args.model), "baseline model")
            continue
        models.setdefault(str(p.run_config.args.model_args.model), "input model")
        source = getattr(p.run_config.method, "source", None)
        if source is not None:
            models.setdefault(str(source), "source checkpoint")
    return models


def check_out(out: Path, kind: str, models: dict[str, str]) -> None:
    """`out` may receive a `kind` (sweep or search): a new or empty directory or one of its own,
    holding none of the input `models` and inside none of them (the rules of a run's --out,
    `runs.rundir.check_run_out`). Checked before anything is written; creates nothing (a dry
    run or --status, which write nothing, need not call it)."""
    for path, what in models.items():
        check_outside_inputs(out, {what: path}, "out")
    found = out_kind(out) if out.is_dir() else None
    if found is not None and found != kind:
        raise UsageError(f"spec: out {out} holds a {found}, this is a {kind}; give another out")
    check_output_dir(out, f"a {kind} directory", lambda path: out_kind(path) == kind)


def _attack_block(value: Any, where: str) -> dict[str, Any] | None:
    """`attack:` is a mapping of attack fields, true (the default attack) or false/absent."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    return mapping(value, where)


def _blocks(raw: dict, here: Path, suite: dict) -> list[MethodBlock]:
    """The spec's method blocks; top-level base and attack are defaults for every block, and the
    `eval:` block's suite fields are added to every run and attack (paths made absolute)."""
    base = mapping(raw.get("base"), "base")
    attack = _attack_block(raw.get("attack"), "attack")
    if "sweeps" not in raw:
        if raw.get("method") is None:
            raise UsageError("spec: give a method (or a list of method blocks under sweeps)")
        return [with_paths(_block(raw, "spec", {}, None), here, suite)]
    clash = sorted(k for k in ("method", "grid", "points") if k in raw)
    if clash:
        raise UsageError(f"spec: with sweeps, {', '.join(clash)} go inside its blocks")
    entries = raw["sweeps"]
    if not isinstance(entries, list) or not entries:
        raise UsageError("spec: sweeps must be a non-empty list of blocks (method:, grid:, ...)")
    blocks = []
    for i, entry in enumerate(entries):
        where = f"sweeps[{i}]"
        if not isinstance(entry, dict):
            raise UsageError(f"{where} must be a mapping (method:, base:, grid:, ...)")
        check_keys(entry, BLOCK_KEYS, where)
        if entry.get("method") is None:
            raise UsageError(f"{where}: method is required")
        blocks.append(with_paths(_block(entry, where, base, attack), here, suite))
    return blocks


def _block(d: dict, where: str, base: dict, attack: dict | None) -> MethodBlock:
    method = d["method"]
    if not isinstance(method, str):
        raise UsageError(f"{where}: method must be a name, got {method!r}")
    get_method(method)  # UsageError listing the known methods
    label = f"{where} ({method})"
    grid = mapping(d.get("grid"), f"{label}: grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UsageError(
                f"{label}: grid.{key} must be a non-empty list of values"
                " (put a single value under base)"
            )
    points = d.get("points", [{}])
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
        raise UsageError(f"{label}: points must be a non-empty list of mappings")
    both = sorted({k for p in points for k in p} & set(grid))
    if both:
        raise UsageError(f"{label}: {', '.join(both)} appear in both grid and points")
    if "attack" in d:
        block_attack = _attack_block(d["attack"], f"{label}: attack")
        attack = None if block_attack is None else {**(attack or {}), **block_attack}
    return MethodBlock(
        label, method, {**base, **mapping(d.get("base"), f"{label}: base")}, grid, points, attack
    )


def _count(block: MethodBlock) -> int:
    """How many points the block expands to, without building them."""
    return len(block.points) * math.prod(len(values) for values in block.grid.values())


# -- expansion and value types -----------------------------------------------------------------


def _expand(block: MethodBlock, world: World | None, out: Path, store: Path) -> list[Point]:
    """The block's points: each explicit point crossed with the grid's cartesian product."""
    sections = run_sections(block.method)
    what = f"{block.method} config"

    def typed(values: dict, where: str) -> dict:
        return typed_values(values, sections, what, SWEEP_RUN_FIELDS, f"{block.label}: {where}")

    base = typed(block.base, "base")
    attack = None
    if block.attack is not None:
        where = f"{block.label}: attack"
        attack = typed_values(
            block.attack, ATTACK_SECTIONS, "attack config", SWEEP_ATTACK_FIELDS, where
        )
    grid = {key: [typed({key: v}, "grid")[key] for v in vs] for key, vs in block.grid.items()}
    explicit = [typed(p, "points") for p in block.points]
    result = []
    for fixed in explicit:
        for combo in itertools.product(*grid.values()):
            varied = {**fixed, **dict(zip(grid, combo, strict=True))}
            point = build_point(
                block.method, block.label, {**base, **varied}, varied, attack, world, out, store
            )
            result.append(point)
    return result


def typed_values(
    values: dict, sections: Sequence[type], what: str, managed: Sequence[str], where: str
) -> dict:
    """The spec's values checked and coerced by the config builder's own rules (ints become
    floats for float fields, so `5` and `5.0` give one id); the fields the sweep sets itself
    are refused, and so is experiment tracking (the command's --report_to ... reports every run
    of the sweep: tracking is never part of a point)."""
    tracked = sorted(k for k in values if k in TRACKING_FIELDS)
    if tracked:
        raise UsageError(f"{where}: {', '.join(tracked)}: experiment tracking is set on the"
                         " command line (--report_to ...), not in a spec")  # fmt: skip
    taken = sorted(k for k in values if k in managed)
    if taken:
        raise UsageError(f"{where}: {', '.join(taken)} set by the sweep itself, remove them")
    return coerce_values(sections, values, what, where)


# -- the slurm: block --------------------------------------------------------------------------


@dataclasses.dataclass
class SlurmSettings:
    """The spec's `slurm:` block: where and how each point's job runs."""

    partition: str | None = None
    """SLURM partition (default: the cluster's)."""
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    """Processes per node; set it to gpus_per_node with distributed: ddp or fsdp2."""
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    time: int = 60
    """Time limit of one job in minutes (a preempted or timed-out point resumes in a new job)."""
    sbatch: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra sbatch options, e.g. {account: proj, qos: high} (submitit's additional parameters)."""
    setup: list[str] = dataclasses.field(default_factory=list)
    """Shell lines run before the job's command (module loads, venv activation)."""
    requeue: int = 3
    """How many times the driver resubmits a point whose run was preempted."""

    def __post_init__(self) -> None:
        for name in ("nodes", "tasks_per_node", "time"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("gpus_per_node", "requeue"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("cpus_per_task", "mem_gb"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.partition is not None and not isinstance(self.partition, str):
            raise UsageError(f"slurm: partition must be a name, got {self.partition!r}")
        if not isinstance(self.sbatch, dict) or not all(isinstance(k, str) for k in self.sbatch):
            raise UsageError(
                f"slurm: sbatch must be a mapping of option: value, got {self.sbatch!r}"
            )
        if not isinstance(self.setup, list) or not all(isinstance(s, str) for s in self.setup):
            raise UsageError(f"slurm: setup must be a list of shell lines, got {self.setup!r}")

    @classmethod
    def from_spec(cls, raw: Any) -> SlurmSettings:
        """Validate the spec's `slurm:` value (None: the defaults)."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise UsageError(f"slurm: must be a mapping (partition:, time:, ...), got {raw!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in set(raw) - set(allowed))
        if unknown:
            raise UsageError(
                f"slurm: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})"
            )
        return cls(**raw)

    def parameters(self, name: str) -> dict[str, Any]:
        """submitit AutoExecutor parameters (`slurm_*` ones are ignored by the local cluster)."""
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": self.time,
            "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node,
            "gpus_per_node": self.gpus_per_node,
            "slurm_additional_parameters": dict(self.sbatch),
            "slurm_setup": list(self.setup),
        }
        if self.partition is not None:
            params["slurm_partition"] = self.partition
        if self.cpus_per_task is not None:
            params["cpus_per_task"] = self.cpus_per_task
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        return params


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"slurm: {name} must be an integer >= {minimum}, got {value!r}")
