"""`unlearn eval`: evaluate a model on the mini world's forget/retain questions.

    unlearn eval --model PATH --world DIR --output OUT.json
    unlearn eval --baselines --world DIR          # target, ignorant checkpoint, filtered twin

Writes `{"results": {task: {"acc", "acc_norm", "correct_prob", "n", ...}}}`; a collapsed model
(one answer position or string for nearly all questions) is flagged in the output and the table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.cliutil import ArgumentParser
from unlearn.errors import UsageError
from unlearn.fsutil import atomic_write_json, check_writable_parent


@dataclass
class EvalConfig:
    """Options of `unlearn eval`."""

    world: str | None = None
    """Mini world directory (its question files are the tasks)."""
    model: str | None = None
    """Model directory or hub id to evaluate."""
    revision: str | None = None
    """Hub revision (e.g. global_step38144) when --model is a hub id."""
    output: str | None = None
    """Where to write the results JSON."""
    tasks: list[str] = field(default_factory=list)
    """Tasks to run (default: all of the world's: forget forget_heldout forget_attack retain)."""
    baselines: bool = False
    """Evaluate the world's target, ignorant checkpoint and filtered twin; print a table."""
    batch_size: int = 64
    """Choices scored per forward pass."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    limit: int | None = None
    """Only the first N questions of each task (quick checks)."""

    def __post_init__(self) -> None:
        if self.world is None:
            raise UsageError("--world is required")
        if not self.baselines and self.model is None:
            raise UsageError("give --model PATH or --baselines")
        if self.baselines and self.model is not None:
            raise UsageError("--baselines evaluates the world's own models; drop --model")
        if self.batch_size < 1:
            raise UsageError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {self.limit}")


def evaluate_model(cfg: EvalConfig, model_name: str, world, progress: bool = True) -> dict:
    """Load one model and evaluate it on the configured tasks."""
    from unlearn.eval.native import evaluate_world
    from unlearn.models import load_model, load_tokenizer, resolve_model

    ref = resolve_model(model_name, cfg.revision)
    tokenizer = load_tokenizer(ref)
    model = load_model(ref, cfg.dtype)
    results = evaluate_world(
        model, tokenizer, world, cfg.tasks or None, cfg.batch_size, progress, cfg.limit
    )
    return {
        "model": str(ref),
        "backend": "native",
        "results": results,
        "collapsed": any(r["collapse"]["collapsed"] for r in results.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn eval", description=__doc__)
    parser.add_arguments(EvalConfig, dest="cfg")
    cfg: EvalConfig = parser.parse_args(argv).cfg

    from unlearn.eval.table import results_table
    from unlearn.models import resolve_model
    from unlearn.world import load_world

    world = load_world(cfg.world)
    unknown = set(cfg.tasks) - set(world.questions)
    if unknown:
        raise UsageError(
            f"unknown task(s) {sorted(unknown)}; the world has {sorted(world.questions)}"
        )
    output = check_writable_parent(cfg.output) if cfg.output else None
    tasks = cfg.tasks or list(world.questions)

    if cfg.baselines:
        models = {
            "Target (to unlearn)": world.target,
            "Ignorant checkpoint (source)": world.ignorant_checkpoint,
            "Filtered twin": world.filtered,
        }
    else:
        models = {Path(cfg.model).name or cfg.model: cfg.model}
    for name in models.values():  # validate every model before loading any weights
        resolve_model(name, cfg.revision)

    out = {label: evaluate_model(cfg, str(name), world) for label, name in models.items()}
    print(results_table({label: o["results"] for label, o in out.items()}, tasks))
    for label, o in out.items():
        if o["collapsed"]:
            print(
                f"warning: {label} looks collapsed (one answer for nearly all questions)",
                file=sys.stderr,
            )
    if output:
        payload = next(iter(out.values())) if not cfg.baselines else {"baselines": out}
        atomic_write_json(output, payload)
        print(f"wrote {output}")
    return 0
