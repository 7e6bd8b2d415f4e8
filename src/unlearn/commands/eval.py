"""`unlearn eval`: evaluate a model on the mini world's forget/retain questions or on benchmarks.

    unlearn eval --model PATH --world DIR --output OUT.json
    unlearn eval --baselines --world DIR          # target, ignorant checkpoint, filtered twin
    unlearn eval --model PATH --world DIR --backend lm-eval        # the same tasks through lm-eval
    unlearn eval --model ID --backend lm-eval --tasks mmlu,wmdp_bio_robust

Writes `{"results": {task: {"acc", "acc_norm", "correct_prob", "n", ...}}}`; a collapsed model
(one answer position or string for nearly all questions) is flagged in the output and the table.
With lm-eval a task that fails is written as `{"status": "failed", "error": ...}` (never a
number) and the command exits 1; a benchmark whose dataset is not cached offline exits 2.
See docs/evaluation.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.cliutil import ArgumentParser
from unlearn.distributed import is_main, join_for_evaluation
from unlearn.errors import UsageError
from unlearn.fsutil import atomic_write_json, check_writable_parent

BACKENDS = ("native", "lm-eval")


@dataclass
class EvalConfig:
    """Options of `unlearn eval`."""

    world: str | None = None
    """Mini world directory (its question files are the tasks)."""
    model: str | None = None
    """Model directory or hub id to evaluate."""
    revision: str | None = None
    """Hub revision (e.g. global_step38144) when --model is a hub id."""
    trust_remote_code: bool = False
    """Let --model run its own modelling code from the hub (off: it executes downloaded code)."""
    output: str | None = None
    """Where to write the results JSON."""
    tasks: list[str] = field(default_factory=list)
    """Tasks to run (default: all of the world's: forget forget_heldout forget_attack retain).
    With --backend lm-eval also bundled and lm-eval tasks: mmlu, wmdp_bio, wmdp_bio_robust, ..."""
    backend: str = "native"
    """native (built-in cloze evaluator, world tasks) or lm-eval (lm-evaluation-harness)."""
    include_path: list[str] = field(default_factory=list)
    """lm-eval: extra folders of task YAMLs (your own tasks)."""
    baselines: bool = False
    """Evaluate the world's target, ignorant checkpoint and filtered twin; print a table."""
    batch_size: int = 64
    """Choices scored per forward pass."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    limit: int | None = None
    """Only the first N questions of each task (quick checks)."""
    num_fewshot: int | None = None
    """lm-eval: few-shot examples, for tasks whose config does not fix them."""
    timeout: float | None = None
    """lm-eval: seconds per model; the evaluation then runs in a child process and is marked
    failed (never scored) when it runs longer."""

    def __post_init__(self) -> None:
        # `--tasks a,b` and `--tasks a b` both work.
        self.tasks = [t for arg in self.tasks for t in arg.split(",") if t]
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend}")
        lm_eval_only = self.num_fewshot is not None or self.timeout is not None or self.include_path
        if self.backend == "native" and lm_eval_only:
            raise UsageError(
                "--num_fewshot, --timeout and --include_path apply to --backend lm-eval only"
            )
        if self.world is None and (self.backend == "native" or not self.tasks or self.baselines):
            raise UsageError("--world is required (or --backend lm-eval with --tasks)")
        if not self.baselines and self.model is None:
            raise UsageError("give --model PATH or --baselines")
        if self.baselines and self.model is not None:
            raise UsageError("--baselines evaluates the world's own models; drop --model")
        if self.batch_size < 1:
            raise UsageError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {self.limit}")
        if self.backend == "lm-eval":
            self.harness_options()  # validates its fields

    def harness_options(self):
        from unlearn.eval.harness import HarnessOptions

        return HarnessOptions(self.batch_size, self.limit, self.num_fewshot, self.timeout)


def evaluate_model(cfg: EvalConfig, model_name: str, world, progress: bool = True) -> dict:
    """Load one model and evaluate it on the configured tasks."""
    from unlearn.eval.native import evaluate_world
    from unlearn.models import default_device, load_model, load_tokenizer, resolve_model

    ref = resolve_model(
        model_name,
        cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        world_dir=world.root if world else None,
    )
    if cfg.backend == "lm-eval":
        return _evaluate_lm_eval(cfg, ref, world)
    tokenizer = load_tokenizer(ref)
    model = load_model(ref, cfg.dtype, default_device())  # under torchrun: this rank's GPU
    results = evaluate_world(
        model, tokenizer, world, cfg.tasks or None, cfg.batch_size, progress, cfg.limit
    )
    return {
        "model": str(ref),
        "backend": "native",
        "results": results,
        "collapsed": any(r["collapse"]["collapsed"] for r in results.values()),
    }


def _evaluate_lm_eval(cfg: EvalConfig, ref, world) -> dict:
    """lm-eval backend: in process, or in a child process under --timeout."""
    from unlearn.eval import harness
    from unlearn.models import default_device, load_model, load_tokenizer

    tasks = cfg.tasks or list(world.questions)
    if cfg.timeout is not None:
        results = harness.run_saved(
            ref.name,
            tasks,
            world,
            cfg.harness_options(),
            ref.revision,
            cfg.dtype,
            cfg.include_path,
            ref.trust_remote_code,
        )
    else:
        # Bad names and missing datasets fail here, before any weights load.
        prepared = harness.prepare_tasks(tasks, world, cfg.include_path)
        model, tokenizer = load_model(ref, cfg.dtype, default_device()), load_tokenizer(ref)
        results = harness.evaluate_prepared(model, tokenizer, prepared, cfg.harness_options())
    return {
        "model": str(ref),
        "backend": "lm-eval",
        "results": results,
        "collapsed": any(r.get("collapse", {}).get("collapsed") for r in results.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn eval", description=__doc__)
    parser.add_arguments(EvalConfig, dest="cfg")
    cfg: EvalConfig = parser.parse_args(argv).cfg
    join_for_evaluation(cfg.backend)  # under torchrun: questions sharded over the ranks

    from unlearn.eval.table import results_table
    from unlearn.models import resolve_model
    from unlearn.world import load_world

    world = load_world(cfg.world) if cfg.world else None
    unknown = set(cfg.tasks) - set(world.questions) if cfg.backend == "native" else set()
    if unknown:
        raise UsageError(
            f"unknown task(s) {sorted(unknown)}; the world has {sorted(world.questions)}"
        )
    output = check_writable_parent(cfg.output) if cfg.output else None
    if output is not None and output.is_dir():  # else found only when writing, after the eval
        raise UsageError(f"--output {output} is a directory; give a file path for the results JSON")
    tasks = cfg.tasks or list(world.questions)
    world_dir = world.root if world else None

    if cfg.baselines:
        models = {
            "Target (to unlearn)": world.target,
            "Ignorant checkpoint (source)": world.ignorant_checkpoint,
            "Filtered twin": world.filtered,
        }
    else:
        models = {Path(cfg.model).name or cfg.model: cfg.model}
    for name in models.values():  # validate every model before loading any weights
        resolve_model(name, cfg.revision, cfg.trust_remote_code, world_dir=world_dir)

    out = {label: evaluate_model(cfg, str(name), world) for label, name in models.items()}
    if not is_main():  # data parallel: rank 0 holds the gathered results and reports them
        return 0
    print(results_table({label: o["results"] for label, o in out.items()}, tasks))
    for label, o in out.items():
        if o["collapsed"]:
            print(
                f"warning: {label} looks collapsed (one answer for nearly all questions)",
                file=sys.stderr,
            )
    failed = [
        (label, task, r["error"])
        for label, o in out.items()
        for task, r in o["results"].items()
        if r.get("status") == "failed"
    ]
    for label, task, error in failed:
        print(f"error: {label}: task {task} failed: {error}", file=sys.stderr)
    if output:
        payload = next(iter(out.values())) if not cfg.baselines else {"baselines": out}
        atomic_write_json(output, payload)
        print(f"wrote {output}")
    return 1 if failed else 0
