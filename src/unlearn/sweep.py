"""Sweeps: one YAML spec -> a grid of unlearning runs -> their evaluations -> optional attacks.

    sweep = load_sweep("ct.yaml")      # parse + validate everything; nothing is written
    states = run_sweep(sweep)          # run (or resume) every point with the local executor

The spec format is documented in docs/sweeps.md.

Design choices:
- The whole spec is validated before anything runs or is written: every point's run and attack
  config is built (unknown fields, values of the wrong type, bad values raise UsageError) and its
  world, model and layers are checked, so a typo in point 17 costs one line, not 16 wasted runs.
- A point's id is readable (method + the values the point varies) plus a hash of everything
  that defines it (method, every override, the world's preset and seed). The same spec always
  gives the same ids and run directories, which is what makes resume work; a changed base value
  gives new ids, so results of a different configuration are never mistaken for this one's.
- Run directories are the truth (unlearn.rundir): resume reads run.json. A point is finished when
  its run is done (with eval rows), collapsed or diverged, and its attack, if asked for, is too.
  A run.json still saying running or pending was left by a killed sweep (the sweep lock rules
  out another live sweep on the same directory): it is marked failed ("interrupted"). A failed
  point is re-run from an empty run directory, so no stale metric or eval row mixes with the new
  ones; re-running a point's unlearning also discards its old attack (it attacked another model).
- An attack whose recorded config differs from the spec's (the attack block was edited) is
  "stale" and re-run; the unlearning run needs no such check, its id hashes its config.
- Executors only decide where and when points run. What a point does is `run_point`, a plain
  function of a picklable `Point`, so a SLURM executor (submitit) can ship it to a job; the local
  one runs points one after another in this process.
- The store is an index: runs write it themselves while they train (status running), and the
  sweep ingests each point's run directories again after the point ends, whatever happened.
- Points are counted (product of the grid's list lengths) before any is built: a spec over
  MAX_POINTS is refused unless the caller raises the limit, since expansion holds them all.
- A stop signal (SIGTERM, SIGUSR1/2) ends a local sweep after the point in progress with
  SweepPreempted (the CLI exits 75); the point checkpoints if it was training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import traceback
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from unlearn.config import coerce_values
from unlearn.data import CorpusSpec
from unlearn.errors import UsageError
from unlearn.methods import get_method
from unlearn.models import ModelRef, check_lora_targets
from unlearn.recipes.attack import (
    ATTACK_SECTIONS,
    AttackConfig,
    build_attack_config,
    run_attack,
)
from unlearn.recipes.unlearning import (
    RunConfig,
    build_run_config,
    run_sections,
    run_unlearning,
    validate,
)
from unlearn.resume import deferring_signals, latest_checkpoint, stop_requested
from unlearn.rundir import RunDir, RunMeta, RunRecord, utc_now
from unlearn.store import Store, check_store
from unlearn.world import World, load_world

if typing.TYPE_CHECKING:
    from unlearn.slurm import SlurmSettings

TOP_KEYS = (
    "name", "world", "out", "store", "method", "base", "grid", "points", "attack", "sweeps",
    "slurm",
)  # fmt: skip
BLOCK_KEYS = ("method", "base", "grid", "points", "attack")
SWEEP_RUN_FIELDS = ("method", "world", "out", "run_id", "store", "eval")
"""Run fields the sweep sets itself (a spec setting them is an error, not silently ignored)."""
SWEEP_ATTACK_FIELDS = ("model", "world", "out", "run_id", "store", "parent")
UNHASHED_FIELDS = ("progress", "checkpoint_every")
"""Fields that cannot change a result, so they do not change a point's id."""
FINISHED = ("done", "collapsed", "diverged")
"""Statuses that are results: a resumed sweep keeps them (a diverged run would diverge again)."""
LOCK_FILE = ".sweep.lock"
MAX_POINTS = 1000
"""The most points a spec may expand to unless `--max_points` (load_sweep's max_points) says
otherwise: every point is built and validated up front, so a grid with one list too many (10^7
points) would otherwise fill the memory before a line is printed (docs/sweeps.md)."""
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


# -- the spec -------------------------------------------------------------------------------


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string (it wants `1.0e-3`); learning rates are written that
    way, so exponent floats resolve to float here. Duplicate keys are an error, not last-wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [
            k.value
            for k, _ in node.value
            if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge"
        ]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key(s) {', '.join(duplicates)}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


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


@dataclasses.dataclass
class Sweep:
    """A validated sweep spec: where things go and every point."""

    name: str
    spec: Path
    world: Path
    out: Path
    store: Path
    points: list[Point]
    slurm: SlurmSettings | None = None
    """The spec's `slurm:` block (job resources for --executor slurm / submitit-local)."""


@dataclasses.dataclass
class _Block:
    """One method's part of a spec (the top level itself, or one entry of `sweeps:`)."""

    label: str
    method: str
    base: dict[str, Any]
    grid: dict[str, list]
    points: list[dict[str, Any]]
    attack: dict[str, Any] | None


def load_sweep(path: str | Path, max_points: int = MAX_POINTS) -> Sweep:
    """Read, validate and expand a sweep spec (UsageError on anything wrong; writes nothing).
    A spec of more than `max_points` points is refused before any point is built."""
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise UsageError(f"--max_points must be >= 1, got {max_points!r}")
    spec = Path(path).expanduser().absolute()
    raw = _read_yaml(spec)
    _check_keys(raw, TOP_KEYS, "spec")
    name = raw.get("name", spec.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UsageError(
            f"spec: name must be a plain file name (letters, digits, ._-), got {name!r}"
        )
    if raw.get("world") is None:
        raise UsageError("spec: world (a mini world directory) is required")
    world = load_world(_spec_path(spec, raw["world"], "world"))
    out = _spec_path(spec, raw["out"], "out") if raw.get("out") is not None else spec.parent / name
    store = (
        _spec_path(spec, raw["store"], "store")
        if raw.get("store") is not None
        else out / "store.sqlite"
    )
    _check_can_create(out, "out")
    if store.is_dir():
        raise UsageError(f"spec: store {store} is a directory, not a SQLite file")
    check_store(store)  # a foreign or corrupt file: refused before any point runs

    blocks = _blocks(raw)
    count = sum(_count(block) for block in blocks)
    if count > max_points:
        raise UsageError(
            f"spec: {count:,} points is more than the limit of {max_points:,}"
            " (check the grid; --max_points N raises the limit)"
        )
    points = []
    for block in blocks:
        points += _expand(block, world, out, store)
    seen: dict[str, str] = {}
    for p in points:
        config = json.dumps([p.method, _hashed(p.overrides)], sort_keys=True)
        if config in seen:
            raise UsageError(f"points {seen[config]} and {p.id} have the same configuration")
        seen[config] = p.id
    _validate_models(points)
    from unlearn.slurm import SlurmSettings

    slurm = SlurmSettings.from_spec(raw.get("slurm"))
    return Sweep(name, spec, world.root, out, store, points, slurm)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"sweep spec {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read sweep spec {path}: {e}") from None
    try:
        raw = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a sweep spec is a YAML mapping (name:, world:, method:, ...)")
    return raw


def _check_keys(d: dict, allowed: Sequence[str], where: str) -> None:
    unknown = sorted(str(k) for k in set(d) - set(allowed))
    if unknown:
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})"
        )


def _spec_path(spec: Path, value: Any, key: str) -> Path:
    """A path from the spec; relative paths resolve against the spec file's directory."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"spec: {key} must be a path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else spec.parent / p


def _check_can_create(path: Path, key: str) -> None:
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


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a mapping of field: value, got {value!r}")
    return dict(value)


def _attack_block(value: Any, where: str) -> dict[str, Any] | None:
    """`attack:` is a mapping of attack fields, true (the default attack) or false/absent."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    return _mapping(value, where)


def _blocks(raw: dict) -> list[_Block]:
    """The spec's method blocks; top-level base and attack are defaults for every block."""
    base = _mapping(raw.get("base"), "base")
    attack = _attack_block(raw.get("attack"), "attack")
    if "sweeps" not in raw:
        if raw.get("method") is None:
            raise UsageError("spec: give a method (or a list of method blocks under sweeps)")
        return [_block(raw, "spec", {}, None)]
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
        _check_keys(entry, BLOCK_KEYS, where)
        if entry.get("method") is None:
            raise UsageError(f"{where}: method is required")
        blocks.append(_block(entry, where, base, attack))
    return blocks


def _block(d: dict, where: str, base: dict, attack: dict | None) -> _Block:
    method = d["method"]
    if not isinstance(method, str):
        raise UsageError(f"{where}: method must be a name, got {method!r}")
    get_method(method)  # UsageError listing the known methods
    label = f"{where} ({method})"
    grid = _mapping(d.get("grid"), f"{label}: grid")
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
    return _Block(
        label, method, {**base, **_mapping(d.get("base"), f"{label}: base")}, grid, points, attack
    )


def _count(block: _Block) -> int:
    """How many points the block expands to, without building them."""
    return len(block.points) * math.prod(len(values) for values in block.grid.values())


def _expand(block: _Block, world: World, out: Path, store: Path) -> list[Point]:
    """The block's points: each explicit point crossed with the grid's cartesian product."""
    sections = run_sections(block.method)
    what = f"{block.method} config"

    def typed(values: dict, where: str) -> dict:
        return _typed(values, sections, what, SWEEP_RUN_FIELDS, f"{block.label}: {where}")

    base = typed(block.base, "base")
    attack = None
    if block.attack is not None:
        where = f"{block.label}: attack"
        attack = _typed(block.attack, ATTACK_SECTIONS, "attack config", SWEEP_ATTACK_FIELDS, where)
    grid = {key: [typed({key: v}, "grid")[key] for v in vs] for key, vs in block.grid.items()}
    explicit = [typed(p, "points") for p in block.points]
    result = []
    for fixed in explicit:
        for combo in itertools.product(*grid.values()):
            varied = {**fixed, **dict(zip(grid, combo, strict=True))}
            result.append(_point(block, {**base, **varied}, varied, attack, world, out, store))
    return result


def _typed(
    values: dict, sections: Sequence[type], what: str, managed: Sequence[str], where: str
) -> dict:
    """The spec's values checked and coerced by the config builder's own rules (ints become
    floats for float fields, so `5` and `5.0` give one id); the fields the sweep sets itself
    are refused."""
    taken = sorted(k for k in values if k in managed)
    if taken:
        raise UsageError(f"{where}: {', '.join(taken)} set by the sweep itself, remove them")
    return coerce_values(sections, values, what, where)


def _point(
    block: _Block,
    overrides: dict,
    varied: dict,
    attack: dict | None,
    world: World,
    out: Path,
    store: Path,
) -> Point:
    pid = point_id(block.method, overrides, varied, f"{world.preset}-{world.seed}")
    where = f"{block.label}, point {pid}"
    run_dir = out / pid
    try:
        run_config = build_run_config(
            block.method,
            {
                **overrides,
                "world": str(world.root),
                "out": str(run_dir),
                "run_id": pid,
                "store": str(store),
            },
        )
        point = Point(pid, block.method, overrides, varied, run_dir, run_config)
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


def _validate_models(points: list[Point]) -> None:
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


# -- the state of a point (read from its run directories) -----------------------------------


@dataclasses.dataclass
class PointState:
    """What a point's run directories say about it."""

    id: str
    status: str
    """The unlearning run's status: pending (no run.json yet) or run.json's status; a done run
    without eval rows reads as failed (the store's invariant)."""
    attack: str | None = None
    """The attack's status (pending, a run status, or stale); None when none is asked for."""
    error: str | None = None
    forget: float | str | None = None
    """Final forget accuracy ("failed" for a failed eval, None when missing)."""
    retain: float | str | None = None
    attacked_forget: float | str | None = None
    """Forget accuracy at the attack's last step (None until the attack has finished)."""
    seconds: float | None = None
    """Run (+ attack) wall time, from run.json's timestamps."""

    @property
    def finished(self) -> bool:
        if self.status not in FINISHED:
            return False
        return self.attack is None or self.status != "done" or self.attack in FINISHED


def _read_dir(path: Path | None) -> tuple[str, RunRecord | None, str | None]:
    """(status, record, error) of one run directory; unreadable counts as failed."""
    if path is None or not RunDir(path).exists():
        return "pending", None, None
    try:
        record = RunDir(path).read()
    except UsageError as e:
        return "failed", None, str(e)
    status = record.meta.status
    if status == "done" and not record.evals:
        return "failed", record, "no eval results"
    return status, record, record.meta.error


def _final_acc(record: RunRecord | None, task: str) -> float | str | None:
    if record is None:
        return None
    rows = [r for r in record.evals if r.task == task and r.metric == "acc"]
    if not rows:
        return None
    last = max(rows, key=lambda r: r.step)
    return "failed" if last.status == "failed" else last.value


def _duration(record: RunRecord | None) -> float | None:
    meta = record.meta if record else None
    if meta is None or not meta.started or not meta.finished:
        return None
    elapsed = datetime.fromisoformat(meta.finished) - datetime.fromisoformat(meta.started)
    return elapsed.total_seconds()


def _json_normal(d: dict) -> dict:
    return json.loads(json.dumps(d))


def inspect_point(point: Point) -> PointState:
    """The point's state from its run directories (reads only)."""
    status, run, error = _read_dir(point.run_dir)
    state = PointState(
        point.id,
        status,
        error=error,
        forget=_final_acc(run, "forget"),
        retain=_final_acc(run, "retain"),
        seconds=_duration(run),
    )
    if point.attack_config is None:
        return state
    attack_status, attack, attack_error = _read_dir(point.attack_dir)
    if attack is not None:
        # The model path is left out: it moves with the out dir and the point id fixes it.
        expected = _json_normal(point.attack_config.to_dict())
        recorded = dict(attack.meta.config)
        expected.pop("model", None)
        recorded.pop("model", None)
        if recorded != expected:
            attack_status = "stale"
    state.attack = attack_status
    if attack_status in FINISHED:
        # A running, preempted or failed attack has only part of its curve: its last point is
        # not the accuracy after the attack, so it is not reported as one.
        state.attacked_forget = _final_acc(attack, "forget")
    state.error = state.error or attack_error
    if state.seconds is not None and _duration(attack) is not None:
        state.seconds += _duration(attack)
    return state


# -- running a point --------------------------------------------------------------------------


def run_point(point: Point) -> PointState:
    """Unlearn (evaluation included) unless finished, then attack if asked and the run is done.

    An exception is recorded in the run directory as status failed (and printed with its
    traceback), never raised: one bad point must not stop a sweep. KeyboardInterrupt does stop
    it (the run records itself as failed on the way out).
    """
    state = inspect_point(point)
    if state.status not in FINISHED:
        _clear(point.run_dir)
        if point.attack_dir is not None:
            _clear(point.attack_dir, keep_checkpoint=False)  # it attacked another model
        meta = RunMeta(point.id, "unlearn", point.method, point.run_config.to_dict())
        _guarded(point.run_dir, meta, lambda: run_unlearning(point.run_config))
        state = inspect_point(point)
    if (
        point.attack_config is not None
        and point.attack_dir is not None
        and state.status == "done"
        and state.attack not in FINISHED
        and not stop_requested()  # the sweep was signalled: the attack waits for the rerun
    ):
        _clear(point.attack_dir)
        cfg = point.attack_config
        meta = RunMeta(f"{point.id}-attack", "attack", config=cfg.to_dict(), parent=point.id)
        _guarded(point.attack_dir, meta, lambda: run_attack(cfg))
        state = inspect_point(point)
    return state


def _clear(path: Path, keep_checkpoint: bool = True) -> None:
    """Remove a previous attempt's run directory (its failure was recorded and reported),
    unless it holds a resumable checkpoint (a preempted or killed run): the run resumes from it.
    In a job with several tasks only rank 0 clears (the others would delete its new files)."""
    if os.environ.get("RANK", "0") != "0":
        return
    if keep_checkpoint and latest_checkpoint(path) is not None:
        return
    if path.exists():
        shutil.rmtree(path)


def _guarded(run_dir: Path, meta: RunMeta, fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        _record_failure(run_dir, meta, f"{type(e).__name__}: {e}")


def _record_failure(run_dir: Path, meta: RunMeta, error: str) -> None:
    """Make sure the run directory says failed (a run that raised before writing run.json, one
    whose own failure handling did not get to run, or a preempted one that could not resume,
    e.g. from a damaged checkpoint: its old "preempted" would hide the reason)."""
    run = RunDir(run_dir)
    status, _, _ = _read_dir(run_dir)
    if status == "pending":
        run.write_run(dataclasses.replace(meta, status="failed", error=error, finished=utc_now()))
    elif status in ("running", "preempted"):
        run.update(status="failed", error=error, finished=utc_now())


# -- executors ----------------------------------------------------------------------------------


OnStart = Callable[[Point], None]
OnDone = Callable[[Point, PointState], None]


class Executor(ABC):
    """Where and when points run. `submit` runs every point with `run_point`, calls
    `on_start(point)` when one starts and `on_done(point, state)` when it ends (the sweep reports
    and ingests there), and returns when all have ended. A cluster executor submits one job per
    point (Point is picklable) and calls the hooks as jobs start and finish."""

    @abstractmethod
    def submit(self, points: Sequence[Point], on_start: OnStart, on_done: OnDone) -> None: ...


class SweepPreempted(Exception):
    """The sweep's process got SIGTERM/SIGUSR1/SIGUSR2: it stopped after the point in progress
    (which checkpointed, if it was training). Running the same sweep again resumes."""

    def __init__(self, signum: int, point_id: str) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name} during point {point_id}"
            " (run the same command again to resume)"
        )
        self.signum, self.point_id = signum, point_id
        self.states: list[PointState] = []
        """Every point's state when the sweep stopped, in spec order (set by run_sweep)."""


class LocalExecutor(Executor):
    """One point after another in this process.

    A stop signal (SIGTERM: preemption; SIGUSR1/2: the time limit is near) ends the sweep after
    the point in progress, never starting the next one: a training run checkpoints and records
    status preempted, anything else (loading, evaluation) finishes first. Then SweepPreempted.
    """

    def submit(self, points: Sequence[Point], on_start: OnStart, on_done: OnDone) -> None:
        with deferring_signals() as latch:
            for i, point in enumerate(points):
                on_start(point)
                state = run_point(point)
                on_done(point, state)
                if latch.signum is not None and (i + 1 < len(points) or not state.finished):
                    raise SweepPreempted(latch.signum, point.id)


@contextlib.contextmanager
def _sweep_lock(out: Path) -> Iterator[None]:
    """One live sweep per output directory: what makes a leftover "running" mean interrupted."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another sweep is running in {out}") from None
        yield  # closing the file releases the lock


def _ingest(store: Path, *dirs: Path | None) -> None:
    with Store(store) as s:
        for d in dirs:
            if d is not None and RunDir(d).exists():
                s.ingest(d)


def _mark_interrupted(sweep: Sweep) -> list[str]:
    """Runs left running/pending by a killed sweep become failed ("interrupted")."""
    marked = []
    for p in sweep.points:
        for d in (p.run_dir, p.attack_dir):
            if d is None or not RunDir(d).exists():
                continue
            status, record, _ = _read_dir(d)
            if record is not None and status in ("running", "pending"):
                RunDir(d).update(status="failed", error="interrupted", finished=utc_now())
                _ingest(sweep.store, d)
                marked.append(d.name)
    return marked


def run_sweep(
    sweep: Sweep, executor: Executor | None = None, log: Callable[[str], None] = print
) -> list[PointState]:
    """Run every point not finished yet; returns each point's final state in spec order."""
    executor = executor or LocalExecutor()
    index = {p.id: i for i, p in enumerate(sweep.points)}
    states: dict[str, PointState] = {}
    with _sweep_lock(sweep.out):
        for name in _mark_interrupted(sweep):
            log(f"{name}: interrupted by an earlier sweep, marked failed; re-running")
        todo = []
        for p in sweep.points:
            state = inspect_point(p)
            if state.finished:
                states[p.id] = state
                log(f"{_counter(index[p.id], sweep)} {_line(state)} (finished earlier)")
            else:
                todo.append(p)
        if todo:
            log(f"{len(todo)} point(s) to run, results in {sweep.out}")

        def on_start(point: Point) -> None:
            values = " ".join(f"{k}={_show(v)}" for k, v in point.varied.items())
            log(f"{_counter(index[point.id], sweep)} {point.id}: starting {values}".rstrip())

        def on_done(point: Point, state: PointState) -> None:
            _ingest(sweep.store, point.run_dir, point.attack_dir)
            states[point.id] = state
            log(f"{_counter(index[point.id], sweep)} {_line(state)}")

        try:
            executor.submit(todo, on_start, on_done)
        except SweepPreempted as e:
            e.states = [states.get(p.id) or inspect_point(p) for p in sweep.points]
            raise
    return [states[p.id] for p in sweep.points]


# -- printing -----------------------------------------------------------------------------------


def _counter(i: int, sweep: Sweep) -> str:
    return f"[{i + 1}/{len(sweep.points)}]"


def _fmt(value: float | str | None) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.3f}"


def _line(state: PointState) -> str:
    """One progress line: `lens-rc5-rm5-3fa2c1: done forget 0.312 retain 0.881 ...`."""
    text = f"{state.id}: {state.status}"
    if state.status in ("done", "collapsed"):
        text += f"  forget {_fmt(state.forget)}  retain {_fmt(state.retain)}"
    if state.attack is not None and state.status == "done":
        text += f"  attack {state.attack}"
        if state.attack in FINISHED:
            text += f" (forget after {_fmt(state.attacked_forget)})"
    if state.seconds is not None:
        text += f"  [{state.seconds:.0f} s]"
    if state.error and not state.finished:
        text += f"  ({state.error})"
    return text


def format_table(states: Sequence[PointState], jobs: dict[str, str] | None = None) -> str:
    """A markdown table of the points (what the seeds' result tables hold), then the errors.
    With `jobs` ({point id: "JOBID STATE"}, from unlearn.slurm) a job column is added."""
    with_attack = any(s.attack is not None for s in states)
    header = ["point", "status", "forget acc", "retain acc"]
    if with_attack:
        header += ["attack", "forget acc after attack"]
    if jobs is not None:
        header.append("job")
    rows = []
    for s in states:
        row = [s.id, s.status, _fmt(s.forget), _fmt(s.retain)]
        if with_attack:
            attack = s.attack if s.attack is not None and s.status == "done" else "-"
            # An unfinished attack shows its status word, never a number from a partial curve.
            after = _fmt(s.attacked_forget) if attack in FINISHED else attack
            row += [attack, after]
        if jobs is not None:
            row.append(jobs.get(s.id, "-"))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in [header, *rows]
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    errors = [f"  {s.id}: {s.error}" for s in states if s.error and not s.finished]
    if errors:
        lines += ["", "errors:", *errors]
    return "\n".join(lines)


def describe_points(sweep: Sweep) -> str:
    """The --dry-run listing: every point's id, method and varied values."""
    methods = sorted({p.method for p in sweep.points})
    lines = [
        f"sweep {sweep.name}: {len(sweep.points)} point(s), method(s) {', '.join(methods)}",
        f"run dirs under {sweep.out}, store {sweep.store}",
    ]
    width = max(len(p.id) for p in sweep.points)
    for p in sweep.points:
        values = " ".join(f"{k}={_show(v)}" for k, v in p.varied.items()) or "(base config)"
        attack = "  + attack" if p.attack_config is not None else ""
        lines.append(f"  {p.id:<{width}}  {values}{attack}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
