"""The evaluation recipe: one model (or the world's baselines) on world tasks or benchmarks.

    evaluation = evaluate(EvalConfig(world="/tmp/w", model_args=ModelArgs("/tmp/r1/model")))

Everything is validated (world, task names, output path, every model's config) before any
weights load. The native backend scores the world's question sets (`unlearn.world.evaluate`);
the lm-eval backend runs world tasks, bundled tasks or lm-eval built-ins (`unlearn.eval.harness`),
in a child process killed on --timeout when one is given. A failed task is
`{"status": "failed", "error": ...}`, never a number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from unlearn.config import ModelArgs
from unlearn.distributed import is_main
from unlearn.errors import UsageError
from unlearn.eval import harness
from unlearn.fsutil import atomic_write_json, check_writable_parent
from unlearn.models import ModelRef, default_device, load_model, load_tokenizer
from unlearn.world import World, evaluate_world, load_world

BACKENDS = ("native", "lm-eval")


@dataclass
class EvalConfig:
    """Options of `unlearn eval`."""

    world: str | None = None
    """Mini world directory (its question files are the tasks)."""
    model_args: ModelArgs = field(default_factory=ModelArgs)
    """The model to evaluate (--model, --revision, --trust_remote_code)."""
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
        if not self.baselines and self.model_args.model is None:
            raise UsageError("give --model PATH or --baselines")
        if self.baselines and self.model_args.model is not None:
            raise UsageError("--baselines evaluates the world's own models; drop --model")
        if self.batch_size < 1:
            raise UsageError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {self.limit}")
        if self.backend == "lm-eval":
            self.harness_options()  # validates its fields

    def harness_options(self) -> harness.HarnessOptions:
        return harness.HarnessOptions(self.batch_size, self.limit, self.num_fewshot, self.timeout)


BASELINES = (
    ("Target (to unlearn)", "target"),
    ("Ignorant checkpoint (source)", "ignorant_checkpoint"),
    ("Filtered twin", "filtered"),
)
"""The world's own models that --baselines evaluates: (table label, World attribute)."""


@dataclass
class Evaluation:
    """What `evaluate` found: the tasks run and each model's output, by table label."""

    tasks: list[str]
    outputs: dict[str, dict]
    """{label: {"model", "backend", "results": {task: result}, "collapsed"}}."""
    output: Path | None = None
    """The results JSON written (None without --output, and on ranks other than 0)."""

    @property
    def collapsed(self) -> list[str]:
        """Labels of the models that look collapsed (one answer for nearly all questions)."""
        return [label for label, o in self.outputs.items() if o["collapsed"]]

    @property
    def failed(self) -> list[tuple[str, str, str]]:
        """(label, task, error) of every failed task."""
        return [
            (label, task, r["error"])
            for label, o in self.outputs.items()
            for task, r in o["results"].items()
            if r.get("status") == "failed"
        ]


def evaluate(cfg: EvalConfig) -> Evaluation:
    """Validate everything (no weights yet), evaluate each model, write --output (rank 0)."""
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
    if cfg.baselines:
        names = {label: str(getattr(world, attr)) for label, attr in BASELINES}
    else:
        name = cfg.model_args.model
        names = {Path(name).name or name: name}
    # Every model is checked (config only) before any weights load.
    refs = {label: _model_args(cfg, name).resolve(world) for label, name in names.items()}
    outputs = {label: evaluate_model(cfg, ref, world) for label, ref in refs.items()}
    written = None
    if output is not None and is_main():  # data parallel: rank 0 holds the gathered results
        payload = next(iter(outputs.values())) if not cfg.baselines else {"baselines": outputs}
        atomic_write_json(output, payload)
        written = output
    return Evaluation(tasks, outputs, written)


def _model_args(cfg: EvalConfig, name: str) -> ModelArgs:
    """--revision and --trust_remote_code applied to `name` (--model or a baseline's path)."""
    return ModelArgs(name, cfg.model_args.revision, cfg.model_args.trust_remote_code)


def evaluate_model(cfg: EvalConfig, ref: ModelRef, world: World | None, progress: bool = True):
    """Load one (validated) model and evaluate it on the configured tasks."""
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


def _evaluate_lm_eval(cfg: EvalConfig, ref: ModelRef, world: World | None) -> dict:
    """lm-eval backend: in process, or in a child process under --timeout."""
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
