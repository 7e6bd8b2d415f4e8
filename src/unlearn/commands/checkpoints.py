"""`unlearn checkpoints`: find the latest pretraining checkpoint that is still ignorant.

    unlearn checkpoints --world /tmp/w                                  # the world's checkpoints
    unlearn checkpoints --model EleutherAI/deep-ignorance-unfiltered \\
        --revisions global_step38144,global_step50064,global_step54832,global_step57216
    unlearn checkpoints --paths ckpt/step1000 ckpt/step2000 --world /tmp/w

Each checkpoint is evaluated on a forget task and a retain task, in the order given (training
order), and the table of the seeds is printed (and written with --out):

    | Checkpoint | forget | retain | Notes |
    | step-00300 | 22.92% | 93.52% | ~Random (latest viable) |

(Notes: ~Random, ~Random (latest viable), Learning starts).

Design choices:

- "Viable" = forget accuracy within `margin` of chance: the checkpoint has not learned the forget
  domain, so it can serve as the source of checkpoint activation transfer. The latest viable one
  is the latest such checkpoint (it knows the most of everything else). "Learning starts" marks
  the first checkpoint after it that is above the band.
- Default margin: two standard errors of an at-chance accuracy over the task's questions,
  2 x sqrt(c (1 - c) / n), at least one point: an at-chance model stays inside the band about 97%
  of the time, whatever the number of questions (about 2.4 points on WMDP-Bio-Robust's 1,270; 12.5
  on the tiny world's 48). Give --margin to fix it.
- Chance: on a world task (either backend), the mean of 1 / (number of choices) over the forget
  questions; on lm-eval benchmarks, --chance (default 0.25: four-choice questions).
- Backends: the native evaluator on a world's tasks (default with --world), or lm-eval tasks
  (`--backend lm-eval`, defaults wmdp_bio_robust and mmlu) through `unlearn.eval.harness`. A failed
  evaluation is shown as failed and never counts as at chance.
- With --store each checkpoint is recorded as a baseline run (role "checkpoint") with its two
  evaluations, so the report can list them next to the runs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.cliutil import ArgumentParser
from unlearn.config import DTYPE_NAMES
from unlearn.errors import UsageError
from unlearn.eval.questions import read_questions
from unlearn.eval.table import pct
from unlearn.fsutil import atomic_write_json, atomic_write_text, check_writable_parent

BACKENDS = ("native", "lm-eval")
NOTE_RANDOM = "~Random"
NOTE_VIABLE = "~Random (latest viable)"
NOTE_LEARNING = "Learning starts"


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
    backend: str | None = None
    """native (world tasks) or lm-eval (benchmarks); default: native with --world."""
    forget_task: str | None = None
    """Default: forget (world) or wmdp_bio_robust (lm-eval)."""
    retain_task: str | None = None
    """Default: retain (world) or mmlu (lm-eval)."""
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
        self.backend = self.backend or ("native" if self.world else "lm-eval")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend}")
        if self.backend == "native" and not self.world:
            raise UsageError("--backend native evaluates a world's questions: give --world")
        native = self.backend == "native"
        self.forget_task = self.forget_task or ("forget" if native else "wmdp_bio_robust")
        self.retain_task = self.retain_task or ("retain" if native else "mmlu")
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


def _cell(result: dict) -> str:
    if result.get("status") == "failed":
        return "failed"
    return pct(result.get("acc"))


def table(checkpoints: list[Checkpoint], forget_task: str, retain_task: str) -> str:
    """The seeds' markdown table: | Checkpoint | forget | retain | Notes |."""
    lines = [
        f"| Checkpoint | {forget_task} | {retain_task} | Notes |",
        "|------------|---|---|-------|",
    ]
    lines += [
        f"| {c.label} | {_cell(c.forget)} | {_cell(c.retain)} | {c.note} |" for c in checkpoints
    ]
    return "\n".join(lines)


def _targets(cfg: CheckpointsConfig, world) -> list[Checkpoint]:
    """The checkpoints to evaluate, validated (config only) before any weights load."""
    from unlearn.models import resolve_model

    world_dir = world.root if world else None
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
        ref = resolve_model(name, rev, cfg.trust_remote_code, world_dir=world_dir)
        out.append(Checkpoint(label, ref.name, rev))
    return out


def _chance(cfg: CheckpointsConfig, world) -> float:
    if cfg.chance is not None:
        return cfg.chance
    if world is None or cfg.forget_task not in world.questions:
        if cfg.backend == "native":
            raise UsageError(f"world has no question task {cfg.forget_task!r}")
        return 0.25  # a benchmark: WMDP-Bio-Robust and MMLU questions have four choices
    # A world task, with either backend: its questions say how many choices each has.
    questions = read_questions(world.questions[cfg.forget_task])[: cfg.limit]
    return sum(1 / len(q["choices"]) for q in questions) / len(questions)


def _evaluator(cfg: CheckpointsConfig, world):
    """A function (model, tokenizer) -> {task: result}, with every task checked up front."""
    tasks = [cfg.forget_task, cfg.retain_task]
    if cfg.backend == "native":
        from unlearn.eval.native import evaluate_world

        missing = sorted(set(tasks) - set(world.questions))
        if missing:
            raise UsageError(f"unknown task(s) {missing}; the world has {sorted(world.questions)}")
        return lambda model, tok: evaluate_world(
            model, tok, world, tasks, cfg.batch_size, False, cfg.limit
        )
    from unlearn.eval import harness

    prepared = harness.prepare_tasks(tasks, world)  # bad names, missing datasets: no weights yet
    options = harness.HarnessOptions(cfg.batch_size, cfg.limit)
    return lambda model, tok: harness.evaluate_prepared(model, tok, prepared, options)


def evaluate_checkpoints(cfg: CheckpointsConfig, world, targets: list[Checkpoint]) -> None:
    """Evaluate each checkpoint in turn (one model in memory at a time); fills the results."""
    from unlearn.models import ModelRef, default_device, load_model, load_tokenizer

    evaluate = _evaluator(cfg, world)
    device = default_device()
    for c in targets:
        ref = ModelRef(c.model, c.revision, cfg.trust_remote_code)
        print(f"evaluating {c.label} ...", file=sys.stderr)
        try:
            results = evaluate(load_model(ref, cfg.dtype, device), load_tokenizer(ref))
        except (OSError, RuntimeError, ValueError) as e:  # a broken checkpoint: record, go on
            failed = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            results = {cfg.forget_task: failed, cfg.retain_task: failed}
        c.forget, c.retain = results[cfg.forget_task], results[cfg.retain_task]


def _record(store_path: str, checkpoints: list[Checkpoint], cfg: CheckpointsConfig) -> None:
    """Each checkpoint as a baseline run with its forget and retain evaluations."""
    from unlearn.eval.native import NUMERIC_METRICS
    from unlearn.runs.rundir import RunMeta, utc_now
    from unlearn.runs.store import Store

    with Store(store_path) as store:
        for c in checkpoints:
            run_id = "ckpt-" + c.label.replace("/", "_")
            config = {"name": f"checkpoint {c.label}", "role": "checkpoint", "model": c.model}
            config |= {"revision": c.revision, "note": c.note}
            meta = RunMeta(
                id=run_id, kind="baseline", config=config, status="running", model_path=c.model
            )
            store.upsert_run(meta)
            for task, result in ((cfg.forget_task, c.forget), (cfg.retain_task, c.retain)):
                if result.get("status") == "failed":
                    store.record_eval(run_id, 0, task, None, "failed", result.get("error"))
                    continue
                keys = [k for m in NUMERIC_METRICS for k in (m, f"{m}_stderr")]
                metrics = {k: result[k] for k in keys if result.get(k) is not None}
                store.record_eval(run_id, 0, task, metrics)
            failed = c.forget_acc is None
            meta.status, meta.finished = ("failed" if failed else "done"), utc_now()
            store.upsert_run(meta)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn checkpoints", description=__doc__)
    parser.add_arguments(CheckpointsConfig, dest="cfg")
    cfg: CheckpointsConfig = parser.parse_args(argv).cfg

    from unlearn.runs.store import check_store
    from unlearn.world import load_world

    world = load_world(cfg.world) if cfg.world else None
    out = check_writable_parent(cfg.out) if cfg.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if cfg.store:
        check_store(cfg.store)  # found now, not after every checkpoint was evaluated
    targets = _targets(cfg, world)
    chance = _chance(cfg, world)
    evaluate_checkpoints(cfg, world, targets)
    n = next((c.forget["n"] for c in targets if c.forget.get("n")), 1)
    margin = cfg.margin if cfg.margin is not None else default_margin(chance, n)
    latest = mark_viable(targets, chance, margin)

    text = table(targets, cfg.forget_task, cfg.retain_task)
    print(text)
    verdict = (
        f"latest viable source checkpoint: {targets[latest].label}"
        if latest is not None
        else "no checkpoint has forget accuracy within the margin of chance"
    )
    print(f"{verdict} (chance {100 * chance:.2f}%, margin {100 * margin:.2f} points)")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "forget_task": cfg.forget_task,
            "retain_task": cfg.retain_task,
            "chance": chance,
            "margin": margin,
            "latest_viable": targets[latest].label if latest is not None else None,
            "checkpoints": [
                {
                    "label": c.label,
                    "model": c.model,
                    "revision": c.revision,
                    "forget": c.forget,
                    "retain": c.retain,
                    "note": c.note,
                }
                for c in targets
            ],
        }
        atomic_write_json(out / "checkpoints.json", payload)
        atomic_write_text(out / "checkpoints.md", f"{text}\n\n{verdict}\n")
        print(f"wrote {out}/checkpoints.json and checkpoints.md")
    if cfg.store:
        _record(cfg.store, targets, cfg)
    return 0 if latest is not None else 1
