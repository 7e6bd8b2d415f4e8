"""Find the latest pretraining checkpoint that is still ignorant of the forget domain.

    result = find_checkpoints(CheckpointsConfig(world="/tmp/w"))
    result.latest          # index of the latest viable checkpoint in result.checkpoints, or None

Each checkpoint is evaluated on a forget task and a retain task, in the order given (training
order); "viable" means a forget accuracy within `margin` of chance. The rules (margin, chance,
notes, backends) are the `unlearn checkpoints` command's, whose docstring states them (--help).
Everything is validated before any weights load; a failed evaluation is shown as failed and is
never viable; with a store each checkpoint is recorded as a baseline run.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.config.settings import DTYPE_NAMES, ModelArgs
from unlearn.errors import UsageError
from unlearn.eval.native import numeric_metrics
from unlearn.eval.suite import BACKENDS, Suite, SuiteArgs, prepare_suite, resolve_suite
from unlearn.fsutil import atomic_write_json, atomic_write_text, check_writable_parent
from unlearn.models.load import default_device, load_model, load_tokenizer
from unlearn.models.refs import ModelRef
from unlearn.report.tables import TASK_HEADERS, markdown_table, result_cell, task_title
from unlearn.runs.rows import RunMeta, utc_now
from unlearn.runs.store import Store, check_store
from unlearn.world import World, load_world

NOTE_RANDOM = "~Random"
NOTE_VIABLE = "~Random (latest viable)"
NOTE_LEARNING = "Learning starts"


# Not a ModelArgs section: it names one model and a list of --revisions (a single --revision
# would mean nothing here); each checkpoint is resolved through a ModelArgs of its own.
@dataclass
class CheckpointsConfig:
    """Options of `unlearn checkpoints`."""

    model: str | None = None
    """Hub id (or local dir) whose --revisions to evaluate."""
    revisions: list[str] = field(default_factory=list)
    """Revisions in training order (`a,b,c` or `a b c`), e.g. global_step38144,global_step54832."""
    paths: list[str] = field(default_factory=list)
    """Checkpoint directories in training order (instead of --model/--revisions)."""
    world: str | None = None
    """Mini world: its checkpoint list (when no models are given) and its question tasks."""
    backend: str = "auto"
    """auto (native where it reproduces lm-eval exactly, else lm-eval), native or lm-eval."""
    forget_task: str | None = None
    """A world task, question file, bundled or lm-eval task; default: forget (world) or
    wmdp_bio_robust."""
    retain_task: str | None = None
    """Same forms; default: retain (world) or mmlu."""
    chance: float | None = None
    """Chance accuracy on the forget task; default: from a world task's choices, else 0.25."""
    margin: float | None = None
    """Viable = forget accuracy <= chance + margin; default: 2 standard errors at chance."""
    out: str | None = None
    """Directory for checkpoints.json and checkpoints.md."""
    store: str | None = None
    """SQLite results store to record each checkpoint in (as a baseline run)."""
    dtype: str = "float32"
    trust_remote_code: bool = False
    """Let the model run its own modelling code from the hub (off: it executes downloaded code)."""
    batch_size: int = 64
    limit: int | None = None
    """Only the first N questions of each task (quick checks)."""

    def __post_init__(self) -> None:
        self.revisions = [r for arg in self.revisions for r in arg.split(",") if r]
        if self.revisions and not self.model:
            raise UsageError("--revisions needs --model (the hub id they belong to)")
        if self.model and not self.revisions:
            raise UsageError("--model needs --revisions (or pass checkpoint dirs with --paths)")
        if self.paths and self.model:
            raise UsageError("give either --model/--revisions or --paths, not both")
        if not (self.model or self.paths or self.world):
            raise UsageError("give --model ID --revisions ..., --paths DIR ..., or --world W")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend}")
        world = self.world is not None
        self.forget_task = self.forget_task or ("forget" if world else "wmdp_bio_robust")
        self.retain_task = self.retain_task or ("retain" if world else "mmlu")
        if self.chance is not None and not 0 < self.chance < 1:
            raise UsageError(f"--chance must be in (0, 1), got {self.chance}")
        if self.margin is not None and not 0 <= self.margin < 1:
            raise UsageError(f"--margin must be in [0, 1), got {self.margin}")
        if self.batch_size < 1:
            raise UsageError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPE_NAMES:
            raise UsageError(f"unknown dtype {self.dtype!r} (choose from {DTYPE_NAMES})")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {self.limit}")


@dataclass
class Checkpoint:
    """One evaluated checkpoint: a label (revision or directory name) and its two results."""

    label: str
    model: str
    revision: str | None
    forget: dict = field(default_factory=dict)
    retain: dict = field(default_factory=dict)
    note: str = ""

    @property
    def forget_acc(self) -> float | None:
        return self.forget.get("acc") if self.forget.get("status") != "failed" else None


@dataclass
class CheckpointsResult:
    """What `find_checkpoints` found, and the reference campaign's table of it."""

    checkpoints: list[Checkpoint]
    chance: float
    margin: float
    latest: int | None
    """Index of the latest viable checkpoint (None: no checkpoint is at chance)."""
    table: str
    verdict: str
    """The latest viable checkpoint, or that there is none (the line under the table)."""
    out: Path | None = None
    """Where checkpoints.json and checkpoints.md were written (None without --out)."""


def default_margin(chance: float, n: int) -> float:
    """Two standard errors of an at-chance accuracy over n questions, at least 0.01."""
    return max(0.01, 2 * math.sqrt(chance * (1 - chance) / max(n, 1)))


def mark_viable(checkpoints: list[Checkpoint], chance: float, margin: float) -> int | None:
    """Set each checkpoint's note; return the index of the latest viable one (None if none).

    Viable: forget accuracy <= chance + margin (a failed evaluation is never viable).
    """
    within = [c.forget_acc is not None and c.forget_acc <= chance + margin for c in checkpoints]
    latest = max((i for i, ok in enumerate(within) if ok), default=None)
    for i, c in enumerate(checkpoints):
        if c.forget_acc is None:
            c.note = "eval failed"
        elif i == latest:
            c.note = NOTE_VIABLE
        elif within[i]:
            c.note = NOTE_RANDOM
        elif latest is not None and i == latest + 1:
            c.note = NOTE_LEARNING
        else:
            c.note = ""
    return latest


def table(checkpoints: list[Checkpoint], forget_task: str, retain_task: str) -> str:
    """The reference campaign's markdown table: | Checkpoint | forget | retain | Notes |, each
    result cell by the one rule (a missing or failed result is a word, never a number)."""
    rows = [
        [c.label, result_cell(c.forget, failed="failed"), result_cell(c.retain, failed="failed"),
         c.note]
        for c in checkpoints
    ]  # fmt: skip
    return markdown_table(["Checkpoint", forget_task, retain_task, "Notes"], rows)


def targets(cfg: CheckpointsConfig, world: World | None) -> list[Checkpoint]:
    """The checkpoints to evaluate, validated (config only) before any weights load."""
    if cfg.model:
        pairs = [(rev, cfg.model, rev) for rev in cfg.revisions]
    elif cfg.paths:
        pairs = [(Path(p).name or p, p, None) for p in cfg.paths]
    else:
        pairs = [(p.name, str(p), None) for p in world.checkpoints]
    if not pairs:
        raise UsageError("no checkpoints to evaluate")
    out = []
    for label, name, rev in pairs:
        ref = ModelArgs(name, rev, cfg.trust_remote_code).resolve(world)
        out.append(Checkpoint(label, ref.name, rev))
    return out


def checkpoint_suite(cfg: CheckpointsConfig, world: World | None) -> Suite:
    """The two tasks as an evaluation suite (checked: names, files; no dataset, no weights)."""
    args = SuiteArgs(
        forget_tasks=[cfg.forget_task],
        retain_tasks=[cfg.retain_task],
        eval_limit=cfg.limit,
        eval_backend=cfg.backend,
    )
    return resolve_suite(args, world)


def chance_level(cfg: CheckpointsConfig, suite: Suite) -> float:
    """--chance, else the mean of 1 / choices over a question file's questions, else 0.25 (a
    benchmark: WMDP-Bio-Robust and MMLU questions have four choices)."""
    return cfg.chance if cfg.chance is not None else suite.chance(suite.forget[0])


Evaluator = Callable[[object, object], dict[str, dict]]
"""(model, tokenizer) -> {task: result}."""


def evaluator(cfg: CheckpointsConfig, suite: Suite) -> Evaluator:
    """The suite as an Evaluator (benchmarks' datasets loaded now, before any weights)."""
    prepared = prepare_suite(suite)
    return lambda model, tok: prepared.evaluate(model, tok, cfg.batch_size)


def evaluate_checkpoints(
    cfg: CheckpointsConfig,
    checkpoints: list[Checkpoint],
    evaluate: Evaluator,
    keys: tuple[str, str] | None = None,
) -> None:
    """Evaluate each checkpoint in turn (one model in memory at a time); fills the results.
    `keys`: the forget and retain tasks' keys (default: the configured names)."""
    keys = keys or (cfg.forget_task, cfg.retain_task)
    device = default_device()
    for c in checkpoints:
        ref = ModelRef(c.model, c.revision, cfg.trust_remote_code)
        print(f"evaluating {c.label} ...", file=sys.stderr)
        try:
            results = evaluate(load_model(ref, cfg.dtype, device), load_tokenizer(ref))
        except (OSError, RuntimeError, ValueError) as e:  # a broken checkpoint: record, go on
            failed = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            results = {key: failed for key in keys}
        c.forget, c.retain = results[keys[0]], results[keys[1]]


def record(store_path: str, checkpoints: list[Checkpoint], keys: tuple[str, str]) -> None:
    """Each checkpoint as a baseline run with its forget and retain evaluations (`keys`: the
    two tasks' names in the store)."""
    with Store(store_path) as store:
        for c in checkpoints:
            run_id = "ckpt-" + c.label.replace("/", "_")
            config = {"name": f"checkpoint {c.label}", "role": "checkpoint", "model": c.model}
            config |= {"revision": c.revision, "note": c.note}
            meta = RunMeta(
                id=run_id, kind="baseline", config=config, status="running", model_path=c.model
            )
            store.upsert_run(meta)
            for task, result in zip(keys, (c.forget, c.retain), strict=True):
                if result.get("status") == "failed":
                    store.record_eval(run_id, 0, task, None, "failed", result.get("error"))
                    continue
                store.record_eval(run_id, 0, task, numeric_metrics(result))
            failed = c.forget_acc is None
            meta.status, meta.finished = ("failed" if failed else "done"), utc_now()
            store.upsert_run(meta)


def find_checkpoints(cfg: CheckpointsConfig) -> CheckpointsResult:
    """Validate (no weights), evaluate every checkpoint, mark the viable ones, write --out's
    checkpoints.json and checkpoints.md and record them in --store."""
    world = load_world(cfg.world) if cfg.world else None
    out = check_writable_parent(cfg.out) if cfg.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if cfg.store:
        check_store(cfg.store)  # found now, not after every checkpoint was evaluated
    suite = checkpoint_suite(cfg, world)
    keys = (suite.forget[0], suite.retain[0])
    checkpoints = targets(cfg, world)
    chance = chance_level(cfg, suite)
    evaluate_checkpoints(cfg, checkpoints, evaluator(cfg, suite), keys)
    n = next((c.forget["n"] for c in checkpoints if c.forget.get("n")), 1)
    margin = cfg.margin if cfg.margin is not None else default_margin(chance, n)
    latest = mark_viable(checkpoints, chance, margin)
    # The reference campaign's headers: the benchmark's name (`WMDP Bio Robust | MMLU`); world tasks
    # as named.
    text = table(checkpoints, *(k if k in TASK_HEADERS else task_title(k) for k in keys))
    verdict = (
        f"latest viable source checkpoint: {checkpoints[latest].label}"
        if latest is not None
        else "no checkpoint has forget accuracy within the margin of chance"
    )
    result = CheckpointsResult(checkpoints, chance, margin, latest, text, verdict)
    if out is not None:
        write(out, result, cfg)
        result.out = out
    if cfg.store:
        record(cfg.store, checkpoints, keys)
    return result


def write(out: Path, result: CheckpointsResult, cfg: CheckpointsConfig) -> None:
    """OUT/checkpoints.json (every result) and OUT/checkpoints.md (the table and verdict)."""
    out.mkdir(parents=True, exist_ok=True)
    latest = result.latest
    payload = {
        "forget_task": cfg.forget_task,
        "retain_task": cfg.retain_task,
        "chance": result.chance,
        "margin": result.margin,
        "latest_viable": result.checkpoints[latest].label if latest is not None else None,
        "checkpoints": [
            {
                "label": c.label,
                "model": c.model,
                "revision": c.revision,
                "forget": c.forget,
                "retain": c.retain,
                "note": c.note,
            }
            for c in result.checkpoints
        ],
    }
    atomic_write_json(out / "checkpoints.json", payload)
    atomic_write_text(out / "checkpoints.md", f"{result.table}\n\n{result.verdict}\n")
