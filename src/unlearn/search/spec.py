"""Search specs: one YAML file -> a validated `Search` (nothing is written, nothing trains).

    search = load_search("rmu-boundary.yaml")

The format is in docs/search.md. It follows sweep specs (`name`, `world` or a model and corpora
in `base`, `out`, `store`, `method` or `methods:`, `base`, `eval:`, `baselines:`, `slurm:`) and
adds `space`, `budget`, `goal`, `delta`, `robustness` (pareto only), `max_forget`, `sampler`,
`pruner`, `intermediate` and `seed`.

Design choices:
- Everything is checked before anything runs: each block's space (`search.space`), and a trial
  config built at the low corner, the high corner and every choice of its space, validated like
  a sweep point (model, layers, corpora), so a range that breaks a config costs one line.
- The goal must be computable from the suite: both goals need a retain task (the boundary's
  constraint, the front's second objective).
- The reference a boundary is measured against is the target model evaluated once with the
  suite (a baseline run, `Search.baselines[0]`); with a world the ignorant checkpoint and the
  filtered twin are evaluated too, as reference points of the plots. A `baselines:` entry with
  role target replaces the default target.
- Choosing on one set of questions and reporting on another: every trial and baseline
  evaluates each forget and retain task in two parts (`unlearn.eval.split`: `forget#select`,
  `forget#report`); the search sees only the selection part, the chosen trials are reported on
  the report part too. best.yaml keeps the spec's own suite (a replay scores whole tasks).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from unlearn.config.settings import ModelArgs, coerce_values
from unlearn.config.yamlio import read_yaml
from unlearn.errors import UsageError
from unlearn.eval.split import PARTS, SELECT_FRACTION, with_part
from unlearn.eval.suite import Suite, SuiteArgs, resolve_suite
from unlearn.methods import get_method
from unlearn.recipes.campaign import BASELINES
from unlearn.recipes.unlearning import run_sections
from unlearn.robustness.plan import RobustnessPlan, plan_from_spec
from unlearn.runs.store import check_store
from unlearn.search.space import Param, parse_space, study_name
from unlearn.sweep.inputs import check_keys, eval_block, mapping, read_baselines, with_paths
from unlearn.sweep.points import (
    Baseline,
    Point,
    build_baseline,
    build_point,
    track,
    validate_models,
)
from unlearn.sweep.spec import (
    SWEEP_RUN_FIELDS,
    MethodBlock,
    SlurmSettings,
    check_can_create,
    input_models,
    spec_path,
    typed_values,
)
from unlearn.tracking import TRACKING_FIELDS, TrackingArgs
from unlearn.world import World, load_world

TOP_KEYS = (
    "name", "world", "out", "store", "method", "methods", "base", "space", "budget", "goal",
    "delta", "eval", "baselines", "robustness", "max_forget", "sampler", "pruner",
    "intermediate", "seed", "slurm",
)  # fmt: skip
BLOCK_KEYS = ("method", "base", "space")
SELECT_PERCENT = f"{100 * SELECT_FRACTION:g}"
GOALS = ("boundary", "pareto")
SAMPLERS = ("tpe", "random", "nsga2")
PRUNERS = ("median", "hyperband", "none")
DEFAULT_DELTA = 0.02
DEFAULT_INTERMEDIATE = 4
"""Parts a pruned trial's training is cut into: it is evaluated after each but the last."""


@dataclasses.dataclass
class MethodSpace:
    """One method's part of a search: its fixed fields and its searched ones."""

    method: str
    label: str
    base: dict[str, Any]
    """Typed fixed fields (spec-relative paths made absolute, the eval: suite added)."""
    params: list[Param]


@dataclasses.dataclass
class Search:
    """A validated search spec."""

    name: str
    spec: Path
    world: Path | None
    out: Path
    store: Path
    blocks: list[MethodSpace]
    budget: int
    goal: str
    delta: float
    baselines: list[Point]
    """Baseline points; the first is the target, the reference of the retain constraint."""
    forget_task: str
    """The suite's first forget task (its whole key: `selection`/`report` give a part's)."""
    retain_tasks: tuple[str, ...]
    split_eval: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The suite fields of every trial and baseline: each forget and retain task in its
    selection and report parts (`unlearn.eval.split`)."""
    robustness: RobustnessPlan | None = None
    """pareto only: the third objective's suite, run on trials that satisfy the constraint."""
    max_forget: float | None = None
    sampler: str = "tpe"
    pruner: str = "none"
    intermediate: int = DEFAULT_INTERMEDIATE
    seed: int = 0
    slurm: SlurmSettings | None = None
    models: dict[str, str] = dataclasses.field(default_factory=dict)
    """The input models ({path: what}): OUT may neither hold one nor lie inside one."""
    tracking: TrackingArgs | None = None
    """The experiment trackers every trial reports to, grouped (the command's --report_to
    ...: not part of the spec, nor of `key`)."""

    @property
    def journal(self) -> Path:
        """The Optuna study's storage (a journal file next to the store)."""
        return self.out / "study.journal"

    @property
    def trials_dir(self) -> Path:
        return self.out / "trials"

    @staticmethod
    def selection(task: str) -> str:
        """The key of a task's selection part (what the search chooses on)."""
        return with_part(task, "select")

    @staticmethod
    def report(task: str) -> str:
        """The key of a task's report part (what the chosen trials are reported on)."""
        return with_part(task, "report")

    @property
    def several(self) -> bool:
        return len(self.blocks) > 1

    @property
    def objectives(self) -> tuple[str, ...]:
        if self.goal == "boundary":
            return ("forget",)
        return ("forget", "retain", "worst_case") if self.robustness else ("forget", "retain")

    def block(self, method: str) -> MethodSpace:
        return next(b for b in self.blocks if b.method == method)

    def point(self, method: str, values: dict[str, Any]) -> Point:
        """The trial of `method` with these sampled values, as a sweep point (its run directory
        under OUT/trials, named by method, values and a hash of the whole config)."""
        block = self.block(method)
        world = _world(str(self.world)) if self.world else None
        point = build_point(method, block.label, {**block.base, **self.split_eval, **values},
                            dict(values), None, world, self.trials_dir, self.store)  # fmt: skip
        return track(point, self.tracking) if self.tracking is not None else point

    def key(self) -> str:
        """A fingerprint of what defines the study (goal, objectives, every block's method, base
        and space): a study in OUT made by another spec is refused, never continued."""
        canon = {
            "goal": self.goal, "delta": self.delta, "objectives": self.objectives,
            "robustness": self.robustness.inputs.suite.key() if self.robustness else None,
            "split_eval": self.split_eval,
            "blocks": [[b.method, b.base, [dataclasses.asdict(p) for p in b.params]]
                       for b in self.blocks],
        }  # fmt: skip
        return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def _world(path: str) -> World:
    return load_world(path)


def load_search(path: str | Path, check_hub: bool = True) -> Search:
    """Read and validate a search spec (UsageError on anything wrong; writes nothing)."""
    spec = Path(path).expanduser().absolute()
    raw = read_yaml(spec, "search spec")
    if not isinstance(raw, dict):
        raise UsageError(f"{spec}: a search spec is a YAML mapping (name:, method:, space:, ...)")
    check_keys(raw, TOP_KEYS, "spec")
    name = raw.get("name", spec.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UsageError(
            f"spec: name must be a plain file name (letters, digits, ._-), got {name!r}"
        )
    goal = _choice(raw, "goal", GOALS, None)
    budget = raw.get("budget")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise UsageError(f"spec: budget (trials) must be an integer >= 1, got {budget!r}")
    delta = raw.get("delta", DEFAULT_DELTA)
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1:
        raise UsageError(f"spec: delta must be a number in [0, 1), got {delta!r}")
    world = load_world(spec_path(spec, raw["world"], "world")) if raw.get("world") else None
    out = spec_path(spec, raw["out"], "out") if raw.get("out") is not None else spec.parent / name
    store = spec_path(spec, raw["store"], "store") if raw.get("store") else out / "store.sqlite"
    check_can_create(out, "out")
    check_outputs_ours(out)
    if store.is_dir():
        raise UsageError(f"spec: store {store} is a directory, not a SQLite file")
    check_store(store)

    suite = eval_block(raw.get("eval"), spec.parent)
    blocks = _blocks(raw, spec.parent, suite)
    whole = resolve_suite(SuiteArgs(**coerce_values((SuiteArgs,), suite, "eval", "eval")), world)
    if not whole.retain:
        raise UsageError(f"spec: goal {goal} needs a retain task (eval: retain_tasks is empty)")
    split = split_suite(suite, whole)
    corners = [p for b in blocks for p in _corners(b, split, world, out, store)]
    validate_models(corners, check_hub)
    first = corners[0]
    extra = read_baselines(raw.get("baselines"), spec.parent, split, world, store)
    baselines = [build_baseline(b, world, out / "baselines")
                 for b in _baselines(extra, first, world, split, store)]  # fmt: skip
    validate_models(baselines, check_hub)
    models = input_models([*corners, *baselines], world)

    robustness = plan_from_spec(raw.get("robustness"), spec.parent, world, SuiteArgs(**suite))
    if robustness is not None and goal != "pareto":
        raise UsageError("spec: robustness: is the pareto goal's third objective (goal: pareto)")
    pruner = _choice(raw, "pruner", PRUNERS, "median" if goal == "boundary" else "none")
    if goal == "pareto" and pruner != "none":
        raise UsageError("spec: pruner: a pareto search has several objectives; Optuna prunes"
                         " single-objective studies only (pruner: none)")  # fmt: skip
    intermediate = raw.get("intermediate", DEFAULT_INTERMEDIATE)
    if isinstance(intermediate, bool) or not isinstance(intermediate, int) or intermediate < 2:
        raise UsageError(f"spec: intermediate must be an integer >= 2, got {intermediate!r}")
    max_forget = raw.get("max_forget")
    if max_forget is not None and (
        isinstance(max_forget, bool) or not isinstance(max_forget, (int, float))
        or not 0 < max_forget <= 1
    ):  # fmt: skip
        raise UsageError(f"spec: max_forget must be a number in (0, 1], got {max_forget!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"spec: seed must be an integer >= 0, got {seed!r}")
    return Search(
        name, spec, world.root if world else None, out, store, blocks, budget, goal,
        float(delta), baselines, whole.forget[0], tuple(whole.retain), split, robustness,
        None if max_forget is None else float(max_forget), _choice(raw, "sampler", SAMPLERS,
        "tpe"), pruner, intermediate, seed, SlurmSettings.from_spec(raw.get("slurm")), models,
    )  # fmt: skip


OUTPUT_MARKS = {"search.md": "# Search ", "best.yaml": "# The best trial "}
"""The first line a search's text outputs start with: a file without it is not ours."""


def check_outputs_ours(out: Path) -> None:
    """Refuse an OUT whose search.md or best.yaml someone else wrote: a search rewrites them."""
    for name, mark in OUTPUT_MARKS.items():
        path = out / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
        if not first.startswith(mark):
            raise UsageError(
                f"{path} was not written by a search (a search rewrites it): move it or give"
                " another out"
            )


def _choice(raw: dict, key: str, allowed: tuple[str, ...], default: str | None) -> str:
    value = raw.get(key, default)
    if value not in allowed:
        shown = "missing" if value is None else repr(value)
        raise UsageError(f"spec: {key} must be one of {', '.join(allowed)} ({shown})")
    return value


def _blocks(raw: dict, here: Path, suite: dict) -> list[MethodSpace]:
    """`method:` + `space:` (one method), or `methods:`, a list of {method, base, space} blocks;
    top-level base and space are defaults of every block."""
    base, space = mapping(raw.get("base"), "base"), mapping(raw.get("space"), "space")
    if "methods" in raw:
        if "method" in raw:
            raise UsageError("spec: give method or methods, not both")
        entries = raw["methods"]
        if not isinstance(entries, list) or not entries:
            raise UsageError("spec: methods must be a non-empty list of {method:, space:} blocks")
    elif raw.get("method") is not None:
        entries = [{"method": raw["method"]}]
    else:
        raise UsageError("spec: give a method (or methods: a list of {method:, space:} blocks)")
    blocks, seen = [], set()
    for i, entry in enumerate(entries):
        where = "spec" if "methods" not in raw else f"methods[{i}]"
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, dict):
            raise UsageError(f"{where} must be a method name or a mapping (method:, space:)")
        check_keys(entry, BLOCK_KEYS, where)
        method = entry.get("method")
        if not isinstance(method, str):
            raise UsageError(f"{where}: method must be a name, got {method!r}")
        get_method(method)  # UsageError listing the known methods
        if method in seen:
            raise UsageError(f"{where}: method {method} appears twice")
        seen.add(method)
        label = f"{where} ({method})"
        merged = MethodBlock(label, method,
                             {**base, **mapping(entry.get("base"), f"{label}: base")}, {}, [{}],
                             None)  # fmt: skip
        merged = with_paths(merged, here, suite)
        sections = run_sections(method)
        typed = typed_values(merged.base, sections, f"{method} config", SWEEP_RUN_FIELDS,
                             f"{label}: base")  # fmt: skip
        block_space = {**space, **mapping(entry.get("space"), f"{label}: space")}
        params = parse_space(block_space, sections, (*SWEEP_RUN_FIELDS, *TRACKING_FIELDS), label)
        clash = sorted(p.field for p in params if p.field in typed)
        if clash:
            raise UsageError(f"{label}: {', '.join(clash)} both fixed in base and searched")
        blocks.append(MethodSpace(method, label, typed, params))
    return blocks


def split_suite(suite: dict[str, Any], whole: Suite) -> dict[str, Any]:
    """The `eval:` block's suite fields with every forget and retain task in its two parts
    (`whole`: that suite resolved; its other tasks are listed as they are)."""
    parted = [t.key for t in whole.tasks if t.part is not None]
    if parted:
        raise UsageError(f"eval: {', '.join(parted)}: a search splits every task into its"
                         " selection and report parts itself; name the whole task")  # fmt: skip
    fields = dict(suite)
    for role in ("forget", "retain", "other"):
        entries = []
        for t in whole.tasks:
            if t.role == role:
                entry = t.source if t.limit is None else f"{t.source}@{t.limit}"
                entries += [with_part(entry, p) for p in PARTS] if role != "other" else [entry]
        fields[f"{role}_tasks"] = entries
    return fields


def _corners(
    block: MethodSpace, split: dict[str, Any], world: World | None, out: Path, store: Path
) -> list[Point]:
    """Trial configs at the space's low and high corners and at each choice (built, so every
    config check runs); where a value breaks a config, the error names the field."""
    low = {p.field: p.choices[0] if p.kind == "choice" else p.low for p in block.params}
    high = {p.field: p.choices[-1] if p.kind == "choice" else p.high for p in block.params}
    variants = [low, high]
    for p in block.params:
        variants += [{**low, p.field: c} for c in p.choices[1:-1]]
    points = []
    for values in variants:
        typed = {k: float(v) if isinstance(v, float) else v for k, v in values.items()}
        points.append(build_point(block.method, block.label, {**block.base, **split, **typed},
                                  typed, None, world, out / "trials", store))  # fmt: skip
    return points


def _baselines(
    extra: list[Baseline], first: Point, world: World | None, suite: dict, store: Path
) -> list[Baseline]:
    """The target first (the constraint's reference), then the world's other references and the
    spec's own baselines."""
    suite_args = SuiteArgs(**suite)
    targets = [b for b in extra if b.role == "target"]
    others = [b for b in extra if b.role != "target"]
    if targets:
        return [targets[0], *others]
    root = str(world.root) if world else None
    if world is not None:
        paths = {"target": world.target, "ignorant": world.ignorant_checkpoint,
                 "filtered": world.filtered}  # fmt: skip
        made = [Baseline(label, ModelArgs(str(paths[role])), role, suite_args, root, str(store))
                for role, label in BASELINES]  # fmt: skip
        return [*made, *others]
    model = first.run_config.args.model_args
    target = Baseline("Target (to unlearn)", dataclasses.replace(model), "target", suite_args,
                      None, str(store))  # fmt: skip
    return [target, *others]


def describe(search: Search) -> str:
    """The --dry-run listing: goal, budget, reference and each method's space."""
    objectives = ", ".join(search.objectives)
    target = search.baselines[0].baseline
    lines = [
        f"search {search.name}: goal {search.goal} ({objectives}), budget {search.budget}"
        f" trials, sampler {search.sampler}, pruner {search.pruner}",
        f"  out: {search.out}   study: {search.journal}   store: {search.store}",
        f"  reference: {target.label} ({target.model_args.model})",
    ]
    if search.goal == "boundary" or search.robustness is not None:
        lines.append(f"  constraint: every retain task ({', '.join(search.retain_tasks)})"
                     f" >= reference - {search.delta:g}")  # fmt: skip
    if search.robustness is not None:
        lines.append(f"  robustness: suite {search.robustness.inputs.suite.name}, run on trials"
                     " that satisfy the constraint")  # fmt: skip
        limit = "" if search.max_forget is None else f" with forget <= {search.max_forget:g}"
        lines.append(f"  best: the smallest worst case among those{limit}")
    lines.append(f"  tasks: forget {search.forget_task}; retain {', '.join(search.retain_tasks)};"
                 f" each split by document index into a selection part ({SELECT_PERCENT}%, the"
                 " trials are chosen on it) and a report part")  # fmt: skip
    suite_fields = {f.name for f in dataclasses.fields(SuiteArgs)}  # shown as tasks above
    for b in search.blocks:
        fixed = ", ".join(f"{k}={v}" for k, v in b.base.items() if k not in suite_fields)
        lines.append(f"  {b.method}: {fixed or 'method defaults'}")
        for p in b.params:
            lines.append(f"    {study_name(b.method, p.field, search.several)}: {p.range_text()}")
    return "\n".join(lines)
