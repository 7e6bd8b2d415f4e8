"""The evaluation recipe: one model (or the world's baselines) on an evaluation suite.

    evaluation = evaluate(EvalConfig(world="/tmp/w", model_args=ModelArgs("/tmp/r1/model")))

Everything is validated (world, tasks, output path, every model's config) and benchmarks'
datasets are loaded before any weights load. The tasks are a suite (`unlearn.eval.suite`): world
tasks, question files, bundled and lm-eval tasks, with roles when given as --forget_tasks /
--retain_tasks (--tasks: reported only). `--backend auto` scores natively whatever the native
evaluator reproduces exactly and the rest through lm-eval; `lm-eval` runs everything through
lm-eval, in a child process killed on --timeout when one is given. A failed task is
`{"status": "failed", "error": ...}`, never a number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.config.settings import ModelArgs
from unlearn.distributed import is_main
from unlearn.errors import UsageError
from unlearn.eval import harness
from unlearn.eval.saved import run_saved
from unlearn.eval.suite import PPL, PreparedSuite, Suite, SuiteArgs, prepare_suite, resolve_suite
from unlearn.fsutil import atomic_write_json, check_output_file
from unlearn.models.load import default_device, load_model, load_tokenizer
from unlearn.models.refs import ModelRef
from unlearn.world import load_world

BACKENDS = ("auto", "native", "lm-eval")


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
    """Tasks to report (no role): world tasks, question files (.jsonl), wmdp_bio_robust,
    wmdp_bio_cloze or lm-eval tasks (mmlu, wmdp_bio, ...); NAME@N = the first N documents.
    Default, with no task at all: the world's tasks, else wmdp_bio_robust and mmlu."""
    forget_tasks: list[str] = field(default_factory=list)
    """Tasks whose accuracy should fall (same forms): columns marked (↓)."""
    retain_tasks: list[str] = field(default_factory=list)
    """Tasks whose accuracy should stay (same forms): columns marked (↑)."""
    backend: str = "auto"
    """auto (native where it reproduces lm-eval exactly, else lm-eval), native or lm-eval."""
    include_path: list[str] = field(default_factory=list)
    """Extra folders of lm-eval task YAMLs (your own tasks, local copies of benchmarks)."""
    baselines: bool = False
    """Evaluate the world's target, ignorant checkpoint and filtered twin; print a table."""
    batch_size: int = 64
    """Choices scored per forward pass (perplexity tasks: document windows)."""
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
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend}")
        lm_eval_only = self.num_fewshot is not None or self.timeout is not None
        if self.backend != "lm-eval" and lm_eval_only:
            raise UsageError("--num_fewshot and --timeout apply to --backend lm-eval only")
        if self.world is None and self.baselines:
            raise UsageError("--baselines evaluates the world's models: give --world")
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
        self.suite_args()  # validates the task entries

    def harness_options(self) -> harness.HarnessOptions:
        return harness.HarnessOptions(self.batch_size, self.limit, self.num_fewshot, self.timeout)

    def suite_args(self) -> SuiteArgs:
        return SuiteArgs(
            forget_tasks=list(self.forget_tasks),
            retain_tasks=list(self.retain_tasks),
            other_tasks=list(self.tasks),
            eval_limit=self.limit,
            eval_backend=self.backend,
            task_dirs=list(self.include_path),
        )


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
    roles: dict[str, str] = field(default_factory=dict)
    """task -> forget, retain or other (names the table's columns)."""
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
    suite = resolve_suite(cfg.suite_args(), world, require_forget=False)
    # A directory or a file eval did not write (the user's notes, a run's run.json) is refused
    # now, not replaced after the evaluation.
    output = None
    if cfg.output:
        output = check_output_file(cfg.output, RESULTS_WHAT, is_eval_results, "--output")
    tasks = suite.task_keys()
    if cfg.baselines:
        names = {label: str(getattr(world, attr)) for label, attr in BASELINES}
    else:
        name = cfg.model_args.model
        names = {Path(name).name or name: name}
    # Every model is checked (config only) before any weights load.
    refs = {label: _model_args(cfg, name).resolve(world) for label, name in names.items()}
    # Benchmarks' datasets load now (missing offline: exit 2), still before any weights.
    prepared = prepare_suite(suite, cfg.num_fewshot) if cfg.timeout is None else None
    outputs = {label: evaluate_model(cfg, ref, suite, prepared) for label, ref in refs.items()}
    written = None
    if output is not None and is_main():  # data parallel: rank 0 holds the gathered results
        payload = next(iter(outputs.values())) if not cfg.baselines else {"baselines": outputs}
        atomic_write_json(output, payload)
        written = output
    roles = {key: role for role, keys in suite.roles().items() for key in keys}
    return Evaluation(tasks, outputs, roles, written)


RESULTS_WHAT = "an eval results file"
RESULT_KEYS = frozenset({"model", "backend", "results", "collapsed"})
"""The keys of one model's results as --output writes them (--baselines: {"baselines": {label:
such an object}})."""


def is_eval_results(path: Path) -> bool:
    """Whether `path` is a results JSON that `unlearn eval --output` wrote (so it may be
    replaced): one model's results, or the baselines' by label. Anything else is not ours."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False

    def one(obj: object) -> bool:
        return (
            isinstance(obj, dict)
            and {"model", "results"} <= obj.keys() <= RESULT_KEYS
            and isinstance(obj["results"], dict)
        )

    if isinstance(data, dict) and data.keys() == {"baselines"}:
        baselines = data["baselines"]
        return isinstance(baselines, dict) and bool(baselines) and all(map(one, baselines.values()))
    return one(data)


def _model_args(cfg: EvalConfig, name: str) -> ModelArgs:
    """--revision and --trust_remote_code applied to `name` (--model or a baseline's path)."""
    return ModelArgs(name, cfg.model_args.revision, cfg.model_args.trust_remote_code)


def evaluate_model(
    cfg: EvalConfig, ref: ModelRef, suite: Suite, prepared: PreparedSuite | None,
    progress: bool = True,
) -> dict:  # fmt: skip
    """Load one (validated) model and evaluate it on the suite (`prepared`; None: through
    lm-eval in a child process killed after --timeout)."""
    if prepared is None:
        results = _evaluate_saved(cfg, ref, suite)
    else:
        tokenizer = load_tokenizer(ref)
        model = load_model(ref, cfg.dtype, default_device())  # under torchrun: this rank's GPU
        results = prepared.evaluate(model, tokenizer, cfg.batch_size, progress)
    return {
        "model": str(ref),
        "backend": cfg.backend,
        "results": results,
        "collapsed": any(r.get("collapse", {}).get("collapsed") for r in results.values()),
    }


def _evaluate_saved(cfg: EvalConfig, ref: ModelRef, suite: Suite) -> dict[str, dict]:
    """--timeout: every task through lm-eval in a child process (killed when it runs long),
    but perplexity tasks, which lm-eval cannot score: natively here, without the timeout."""
    ppl = [t.key for t in suite.tasks if t.kind == PPL]
    others = [t for t in suite.tasks if t.kind != PPL]
    local = {t.key: ("cloze" if t.kind == "world" else t.kind, t.path) for t in others
             if t.path is not None}  # fmt: skip
    results = {}
    if others:
        results = run_saved(
            ref.name,
            [t.key for t in others],
            None,
            cfg.harness_options(),
            ref.revision,
            cfg.dtype,
            suite.task_dirs,
            ref.trust_remote_code,
            local,
        )
    if ppl:
        model = load_model(ref, cfg.dtype, default_device())
        native = PreparedSuite(suite, None, frozenset())
        results.update(native.evaluate(model, load_tokenizer(ref), cfg.batch_size, keys=ppl))
    return {key: results[key] for key in suite.task_keys()}
