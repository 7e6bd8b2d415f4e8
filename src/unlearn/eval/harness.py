"""The lm-evaluation-harness backend: benchmarks and the mini world's questions through lm-eval.

Design choices:

- **One adapter, two ways in.** `run_tasks` evaluates a live model: lm-eval's `HFLM` wraps the
  model and tokenizer we already hold (nothing is copied or reloaded). `unlearn.eval.saved`'s
  `run_saved` evaluates a model directory or hub id in a child process, so a hung or crashing
  evaluation can be killed by a timeout without taking the caller down.
- **Task names.** A name is a world question set (`forget`, `forget_heldout`, `forget_attack`,
  `retain`, when a world is given), a local question file given as `local` ({name: (schema,
  path)}), a task bundled with this package (`eval/tasks/`: `wmdp_bio_robust`, `wmdp_bio_cloze`)
  or any lm-eval built-in (`mmlu`, `wmdp_bio`). lm-eval's own index (about 15k configs, seconds
  to scan) is built only when a name is not found among ours.
- **Question files equal the native evaluator.** World tasks and cloze files are inline task
  configs whose requests are exactly the native evaluator's: context = prompt, continuation =
  choice (target delimiter "", since every choice starts with its space), no BOS token, and the
  bundled cloze `process_results` (acc, acc_norm, correct_prob); letter files use the prompt
  functions of `unlearn.eval.letter` and the tokenizer's default special tokens, as benchmarks
  do. So both backends give the same accuracy on the same model (tests/eval/test_lm_eval.py).
- **Results are read from the dict `simple_evaluate` returns**, never from printed tables:
  `"{metric},{filter}"` entries of `results[task]` (a group's are its aggregate), `n` from
  `n-samples`, and the collapse check from the logged per-document log-likelihoods.
- **Failure is never a number.** An evaluation that raises, reports no metric or a non-finite
  one raises `HarnessError` (`run_tasks` records it per task as
  `{"status": "failed", "error": ...}` and goes on with the others); so does a saved-model
  evaluation that runs past its timeout (its unfinished tasks). A dataset that cannot be
  loaded (offline and not cached) is bad input: `UsageError`, one line naming the task and how to
  make it available, raised while the tasks are prepared, before any weights load.

Size: ~390 lines, the lm-eval boundary (task preparation, the live-model path, result
translation) so that nothing else but `saved.py` (the child-process path) imports lm-eval.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.errors import UsageError
from unlearn.eval.collapse import collapse_report
from unlearn.eval.letter import letter_task_config
from unlearn.eval.questions import CLOZE, read_question_file
from unlearn.eval.split import limited_part
from unlearn.eval.tasks import TASKS_DIR
from unlearn.eval.tasks.utils import cloze_results
from unlearn.models.modes import eval_mode

WORLD_TASK_PREFIX = "world_"
"""lm-eval name of a world task or local question file: `world_forget` is reported as `forget`."""
BUNDLED_TASKS = ("wmdp_bio_robust", "wmdp_bio_cloze")
WORLD_METRICS = ("acc", "acc_norm", "correct_prob")


class HarnessError(RuntimeError):
    """An lm-eval evaluation failed: record it as failed with this text, never as a number."""


@dataclass(frozen=True)
class HarnessOptions:
    """How lm-eval runs (shared by in-memory and saved-model evaluations)."""

    batch_size: int = 64
    """Requests per forward pass."""
    limit: int | None = None
    """Only the first N documents of each task (quick checks)."""
    num_fewshot: int | None = None
    """Few-shot examples; tasks whose config fixes 0 (all of ours) stay 0-shot."""
    timeout: float | None = None
    """Seconds a saved-model evaluation may run before it is killed and marked failed."""
    part: str | None = None
    """select or report: only that part of each (sub)task's documents (`unlearn.eval.split`)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UsageError(f"--num_fewshot must be >= 0, got {self.num_fewshot}")
        # `nan <= 0` is False, so a plain comparison let --timeout nan through (and inf would
        # overflow the wait); a timeout is a finite number of seconds.
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise UsageError(f"--timeout must be a finite number > 0 (seconds), got {self.timeout}")


def local_task_config(name: str, kind: str, questions_file: str | os.PathLike) -> dict:
    """Inline lm-eval config of a question file of either schema (`unlearn.eval.questions`)."""
    if kind == CLOZE:
        return world_task_config(name, questions_file)
    return letter_task_config(WORLD_TASK_PREFIX + name, questions_file)


def world_task_config(name: str, questions_file: str | os.PathLike) -> dict:
    """Inline lm-eval config of one world question set (scored exactly like eval/native.py).

    lm-eval's multiple_choice takes each document's own list of choices, so questions with any
    number of choices (two up; `unlearn.eval.questions`) work as they do natively.
    """
    return {
        "task": WORLD_TASK_PREFIX + name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(questions_file).absolute())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "num_fewshot": 0,
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        # Choices carry their leading space, so the scored text is prompt + choice, as in native.
        "target_delimiter": "",
        "process_results": cloze_results,
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in WORLD_METRICS
        ],
        "metadata": {"version": 1},
    }


@dataclass
class PreparedTasks:
    """Tasks built and their data loaded, ready to run on any number of models."""

    objects: dict = field(default_factory=dict)
    """Requested name -> lm-eval Task or Group."""
    failed: dict[str, str] = field(default_factory=dict)
    """Requested name -> why it could not be built (recorded as a failed eval)."""
    world_names: frozenset[str] = frozenset()
    """Question-file tasks scored without special tokens (cloze: the world's rule)."""
    task_manager: object = None


@functools.lru_cache(maxsize=4)
def _cached_task_manager(paths: tuple[str, ...], include_defaults: bool):
    # Scanning lm-eval's own ~15k configs takes seconds; a TaskManager only indexes, so one
    # serves every evaluation in the process (e.g. the three models of `eval --baselines`).
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def _task_manager(registered: Sequence[str], include_path: Sequence[str | os.PathLike] = ()):
    """A TaskManager that knows our bundled tasks (and `include_path`'s), and lm-eval's own
    only if a name needs them."""
    paths = (str(TASKS_DIR), *(str(Path(p).absolute()) for p in include_path))
    tm = _cached_task_manager(paths, include_defaults=False)
    if any(name not in tm.all_tasks for name in registered):
        tm = _cached_task_manager(paths, include_defaults=True)
    unknown = [name for name in registered if name not in tm.all_tasks]
    if unknown:
        raise UsageError(
            f"unknown task(s) {unknown}: not a world task, a bundled task "
            f"({', '.join(BUNDLED_TASKS)}) or an lm-eval task (list them with `lm_eval ls tasks`)"
        )
    return tm


def check_task_names(names: Sequence[str], include_path: Sequence[str | os.PathLike] = ()) -> None:
    """UsageError (one line) unless every name is a bundled or lm-eval task or group; reads
    lm-eval's task index only (no dataset, no network)."""
    _task_manager(names, include_path)


def _dataset_error(name: str, error: Exception) -> UsageError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UsageError(
        f"task {name}: dataset not available ({first}); run this once where the Hugging Face hub "
        "is reachable, with the same HF_HOME, to cache it (then HF_HUB_OFFLINE=1 works here)"
    )


def prepare_tasks(
    names: Sequence[str],
    world=None,
    include_path: Sequence[str | os.PathLike] = (),
    local: Mapping[str, tuple[str, str]] | None = None,
) -> PreparedTasks:
    """Resolve task names and load their data. Unknown names and missing datasets: UsageError.

    `world`: a World, or anything with its `questions` ({task: question file}).
    `include_path`: extra folders of lm-eval task YAMLs (your own tasks).
    `local`: question files by task name, {name: (schema, path)} (`unlearn.eval.questions`).
    """
    files = {n: (CLOZE, str(p)) for n, p in (world.questions if world is not None else {}).items()}
    files.update(local or {})
    kinds = {}
    for name in names:
        if name in files:  # lm-eval would fail on a bad row only after the model loaded
            kinds[name] = read_question_file(files[name][1])[0]
    tm = _task_manager([n for n in names if n not in files], include_path)
    cloze = frozenset(n for n, kind in kinds.items() if kind == CLOZE)
    prepared = PreparedTasks(world_names=cloze)
    prepared.task_manager = tm
    for name in names:
        spec = local_task_config(name, kinds[name], files[name][1]) if name in files else name
        lm_name = WORLD_TASK_PREFIX + name if name in files else name
        try:
            loaded = tm.load([spec])
        except (ConnectionError, FileNotFoundError) as e:
            raise _dataset_error(name, e) from None
        except Exception as e:  # a broken config fails this task only
            prepared.failed[name] = f"could not build task: {type(e).__name__}: {e}"
            continue
        groups = loaded.get("groups") or {}
        prepared.objects[name] = groups[lm_name] if lm_name in groups else loaded["tasks"][lm_name]
    return prepared


def _leaf_tasks(obj) -> list:
    from lm_eval.api.group import Group

    return list(obj.get_all_tasks()) if isinstance(obj, Group) else [obj]


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HarnessError(f"lm-eval reported a non-finite or non-numeric {what}: {value!r}")
    return float(value)


def parse_metrics(entry: dict, task: str) -> dict[str, float | None]:
    """`{"acc,none": .., "acc_stderr,none": ..}` -> `{"acc": .., "acc_stderr": ..}`.

    Metrics are taken under the first filter that reports them ("none" for log-likelihood
    tasks). A stderr lm-eval could not compute ("N/A") becomes None; a metric must be a finite
    number, and a task with no metric at all is a failure.
    """
    values: dict[str, float | None] = {}
    for key, value in entry.items():
        name, sep, _filter = key.partition(",")
        if not sep or name.endswith("_stderr") or name in values:
            continue
        values[name] = _number(value, f"{name} for {task}")
        stderr = entry.get(f"{name}_stderr,{_filter}")
        values[f"{name}_stderr"] = (
            None if stderr is None or isinstance(stderr, str) else _number(stderr, "stderr")
        )
    if not values:
        raise HarnessError(f"lm-eval returned no metric for task {task}")
    return values


def _collapse(raw: dict, leaves: list) -> dict | None:
    """Collapse check from the logged samples of multiple-choice leaves (None otherwise)."""
    positions: list[int] = []
    strings: list[str] = []
    n_choices = 0
    for task in leaves:
        if task.OUTPUT_TYPE != "multiple_choice":
            return None
        for sample in raw.get("samples", {}).get(task.task_name, []):
            logliks = [float(resp[0]) for resp in sample["filtered_resps"]]
            pred = max(range(len(logliks)), key=lambda i: logliks[i])
            choices = task.doc_to_choice(sample["doc"])
            positions.append(pred)
            strings.append(str(choices[pred]))
            n_choices = max(n_choices, len(choices))
    if not positions:
        return None
    return collapse_report(positions, strings, n_choices=n_choices)


def parse_result(raw: dict, obj) -> dict:
    """Our result shape for one requested task or group, from `simple_evaluate`'s dict."""
    name = obj.name if hasattr(obj, "get_all_tasks") else obj.task_name
    entry = raw.get("results", {}).get(name) or raw.get("groups", {}).get(name)
    if not entry:
        raise HarnessError(f"lm-eval returned no results for task {name}")
    metrics = parse_metrics(entry, name)
    leaves = _leaf_tasks(obj)
    counts = raw.get("n-samples", {})
    n = sum(int(counts.get(t.task_name, {}).get("effective", 0)) for t in leaves)
    if n == 0:
        raise HarnessError(f"lm-eval evaluated no documents for task {name}")
    result: dict = {"n": n, **metrics}
    collapse = _collapse(raw, leaves)
    if collapse is not None:
        result["collapse"] = collapse
    return result


def _quiet_git_hash() -> str | None:
    """lm-eval's commit-hash lookup, without git's stderr."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _quiet_lm_eval() -> None:
    """lm-eval and datasets log every request batch; keep warnings only."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    import datasets
    import lm_eval.evaluator

    datasets.disable_progress_bars()
    # simple_evaluate always records the git hash of the working directory by running
    # `git describe` with its stderr inherited: outside a repository every task printed
    # "fatal: not a git repository". The hash only goes into the results dict's metadata.
    lm_eval.evaluator.get_git_commit_hash = _quiet_git_hash


def evaluate_one(lm, prepared: PreparedTasks, name: str, options: HarnessOptions) -> dict:
    """Run one prepared task on an lm-eval model; HarnessError if it fails in any way."""
    from lm_eval import simple_evaluate

    if name in prepared.failed:
        raise HarnessError(prepared.failed[name])
    obj = prepared.objects[name]
    limit, samples = options.limit, None
    try:
        if options.part is not None:  # lm-eval takes a limit or document indices, not both
            samples = {t.task_name: limited_part(len(t.eval_docs), limit, options.part)
                       for t in _leaf_tasks(obj)}  # fmt: skip
            limit = None
        raw = simple_evaluate(
            lm,
            tasks=[obj],
            num_fewshot=options.num_fewshot,
            limit=limit,
            samples=samples,
            task_manager=prepared.task_manager,
            log_samples=True,
            # Mean metrics get closed-form stderrs; bootstrap serves only the others.
            bootstrap_iters=1000,
        )
    except Exception as e:
        raise HarnessError(f"{type(e).__name__}: {e}") from e
    if raw is None:
        raise HarnessError("lm-eval returned nothing (not the main process?)")
    return parse_result(raw, obj)


def evaluate_prepared(
    model,
    tokenizer,
    prepared: PreparedTasks,
    options: HarnessOptions = HarnessOptions(),
    on_result: Callable[[str, dict], None] | None = None,
) -> dict[str, dict]:
    """Evaluate a live model on prepared tasks: {name: result or {"status": "failed", ...}}.

    `on_result(name, result)` is called as each task finishes (the child process streams them).
    """
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    lms: dict[bool, object] = {}

    def lm_for(name: str):
        # World tasks add no BOS token, like the native evaluator; benchmarks keep lm-eval's
        # default for the tokenizer, so their numbers match a plain `lm_eval` run.
        world = name in prepared.world_names
        if world not in lms:
            lms[world] = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=options.batch_size,
                add_bos_token=False if world else None,
            )
        return lms[world]

    results: dict[str, dict] = {}
    with eval_mode(model):  # HFLM switches the model to eval mode; it leaves as it came
        for name in [*prepared.objects, *prepared.failed]:
            try:
                results[name] = evaluate_one(lm_for(name), prepared, name, options)
            except HarnessError as e:
                results[name] = {"status": "failed", "error": str(e)}
            if on_result is not None:
                on_result(name, results[name])
    return results


def run_tasks(
    model, tokenizer, names: Sequence[str], world=None, options: HarnessOptions = HarnessOptions()
) -> dict[str, dict]:
    """Evaluate a live model on tasks by name (see the module docstring for the names)."""
    return evaluate_prepared(model, tokenizer, prepare_tasks(names, world), options)


def failed_tasks(results: dict[str, dict]) -> dict[str, str]:
    """{task: error} of the failed entries of a results dict."""
    return {t: r["error"] for t, r in results.items() if r.get("status") == "failed"}
