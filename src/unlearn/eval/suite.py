"""Evaluation suites: which tasks an evaluation runs, the role of each, and how each is scored.

    suite = resolve_suite(SuiteArgs(forget_tasks=["wmdp_bio_robust"], retain_tasks=["mmlu@500"]))
    prepared = prepare_suite(suite)                   # datasets loaded: still no weights
    score = prepared.scorer(model, tokenizer)         # score(task key) -> (metrics, collapsed)

A task is any of
- a world task (`forget`, `forget_heldout`, `forget_attack`, `retain`, `retain_late`,
  `near_domain`; a perplexity task such as `general_ppl`) when a world is given;
- a local question file (`path/to/q.jsonl`): `{prompt, choices, answer}` rows are cloze as in the
  world, `{question, choices, answer}` rows letter multiple choice (`unlearn.eval.letter`); its
  key in tables and stores is the file's stem;
- a bundled task (`wmdp_bio_robust`, `wmdp_bio_cloze`) or any lm-eval task or group name;
- a perplexity task `ppl:PATH` (documents: a JSONL of `{"text"}` rows, or a text file with one
  document per blank-line-separated block; `unlearn.eval.perplexity`); its key is the file's stem.
`NAME@N` scores the first N documents of the task (of each subtask of a group); `eval_limit`
applies to every task without its own. `NAME#select` and `NAME#report` (after any `@N`) score
one of two disjoint parts of those documents, split by document index (`unlearn.eval.split`):
a search chooses on the selection part and reports on the other.

Perplexity tasks (kind "ppl") report `ppl`, `nll` and `tokens` instead of an accuracy: lower is
better, so they are `other` tasks only (given as a forget or retain task: UsageError); they are
always scored natively, whatever the backend (lm-eval has no live-model perplexity of a file).

Roles: `forget` (should fall), `retain` (should stay), `other` (reported only). Defaults, when no
task is given at all: with a world, its tasks (forget and forget_heldout forget; retain,
retain_late and near_domain retain; forget_attack and the perplexity tasks other); without one,
`wmdp_bio_robust` (forget) and `mmlu` (retain). A suite needs at least one forget task. Where a
summary shows one "retain" number it is the minimum over the retain tasks
(`unlearn.report.analysis.retain_aggregate`), each task still shown beside it.

Scoring (`eval_backend`): `auto` scores question files natively, and lm-eval tasks natively too
when the native path reproduces them exactly (`unlearn.eval.lm_tasks.native_problem`), else
through lm-eval on the live model; `native` refuses a task it cannot reproduce; `lm-eval` runs
every task through lm-eval. Either way the model in memory is scored (no save/load round trip),
and a task that fails is a failed row, never a number. Under torchrun the native path shards its
batches over the ranks; lm-eval cannot score a live model there, so such a suite is refused.

Everything is checked by `resolve_suite` (names, files row by row, limits) without loading a
dataset, so `--dry-run` needs no network; `prepare_suite` then loads lm-eval tasks' datasets
(a dataset that is not available offline is bad input), still before any weights load.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from unlearn.distributed import env_world_size
from unlearn.errors import UsageError
from unlearn.eval import harness
from unlearn.eval.collapse import collapse_reason
from unlearn.eval.letter import as_cloze
from unlearn.eval.lm_tasks import native_problem, score_lm_task
from unlearn.eval.native import evaluate_questions, numeric_metrics
from unlearn.eval.perplexity import evaluate_perplexity, read_documents
from unlearn.eval.questions import CLOZE, LETTER, read_question_file
from unlearn.eval.split import split_entry, take_part, with_part

ROLES = ("forget", "retain", "other")
BACKENDS = ("auto", "native", "lm-eval")
WORLD_ROLES = {
    "forget": "forget",
    "forget_heldout": "forget",
    "retain": "retain",
    "retain_late": "retain",
    "near_domain": "retain",
}
"""A world task's role in the default suite (others, e.g. forget_attack: other; a world's
perplexity tasks are always other)."""
DEFAULT_BENCHMARKS = {"forget": ["wmdp_bio_robust"], "retain": ["mmlu"], "other": []}
QUESTION_SUFFIXES = (".jsonl", ".json")
PPL, PPL_PREFIX = "ppl", "ppl:"
"""The kind of a perplexity task, and how one names a document file as a task (`ppl:PATH`)."""
_LIMIT = re.compile(r"^(?P<name>.+)@(?P<limit>-?\d+)$")


@dataclass
class SuiteArgs:
    """The evaluation suite (a config section: flat names on the command line and in specs)."""

    forget_tasks: list[str] = field(default_factory=list)
    """Tasks whose accuracy should fall: world tasks (forget forget_heldout), question files
    (.jsonl), wmdp_bio_robust, wmdp_bio_cloze or lm-eval tasks; NAME@N = its first N documents.
    Default: the world's forget tasks, else wmdp_bio_robust."""
    retain_tasks: list[str] = field(default_factory=list)
    """Tasks whose accuracy should stay (same forms). Default: the world's retain, else mmlu."""
    other_tasks: list[str] = field(default_factory=list)
    """Tasks reported only (same forms, and perplexity tasks: the world's general_ppl, or
    ppl:PATH of a .jsonl of {"text"} rows or a .txt of blank-line-separated documents).
    Default: the world's forget_attack and perplexity tasks."""
    eval_limit: int | None = None
    """Only the first N documents of each task without its own @N (cheap in-loop curves)."""
    eval_backend: str = "auto"
    """auto (native where it reproduces lm-eval exactly, else lm-eval), native or lm-eval."""
    task_dirs: list[str] = field(default_factory=list)
    """Extra folders of lm-eval task YAMLs (your own tasks, or local copies of benchmarks)."""

    def __post_init__(self) -> None:
        for role in ROLES:  # `--forget_tasks a,b` and `--forget_tasks a b` both work
            setattr(self, f"{role}_tasks", _split(getattr(self, f"{role}_tasks")))
            for entry in getattr(self, f"{role}_tasks"):
                parse_entry(split_entry(entry)[0])
        if self.eval_limit is not None and self.eval_limit < 1:
            raise UsageError(f"--eval_limit must be >= 1, got {self.eval_limit}")
        if self.eval_backend not in BACKENDS:
            raise UsageError(
                f"--eval_backend must be one of {', '.join(BACKENDS)}, got {self.eval_backend}"
            )

    @property
    def given(self) -> bool:
        return bool(self.forget_tasks or self.retain_tasks or self.other_tasks)


def _split(entries: Sequence[str]) -> list[str]:
    return [e.strip() for arg in entries for e in str(arg).split(",") if e.strip()]


def parse_entry(entry: str) -> tuple[str, int | None]:
    """`mmlu@200` -> ("mmlu", 200); `mmlu` -> ("mmlu", None). A limit must be >= 1."""
    m = _LIMIT.match(entry)
    if m is None:
        return entry, None
    limit = int(m["limit"])
    if limit < 1:
        raise UsageError(f"task {entry}: the limit after @ must be >= 1, got {limit}")
    return m["name"], limit


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite, resolved."""

    key: str
    """Its name in evals.jsonl, the store and tables (a question file: the file's stem)."""
    source: str
    """As written (a path, a name)."""
    role: str
    kind: str
    """world, cloze, letter (question files), lm-eval (bundled and lm-eval tasks) or ppl
    (perplexity on a document file)."""
    limit: int | None = None
    path: str | None = None
    """The question file (world, cloze and letter tasks) or the document file (ppl)."""
    part: str | None = None
    """select or report: only that part of the documents (`unlearn.eval.split`); None: all."""

    @property
    def metric(self) -> str:
        """The metric a summary reads (and a failed evaluation is recorded under): ppl for a
        perplexity task, else acc."""
        return PPL if self.kind == PPL else "acc"


@dataclass(frozen=True)
class Suite:
    """The resolved tasks of an evaluation and how they are scored."""

    tasks: tuple[SuiteTask, ...]
    backend: str = "auto"
    task_dirs: tuple[str, ...] = ()
    """Extra folders of lm-eval task YAMLs, absolute."""

    def task_keys(self, role: str | None = None) -> list[str]:
        return [t.key for t in self.tasks if role is None or t.role == role]

    @property
    def forget(self) -> list[str]:
        return self.task_keys("forget")

    @property
    def retain(self) -> list[str]:
        return self.task_keys("retain")

    def task(self, key: str) -> SuiteTask:
        return next(t for t in self.tasks if t.key == key)

    def metric(self, key: str) -> str:
        """`SuiteTask.metric` of the task `key` (for `ActiveRun.evaluate`)."""
        return self.task(key).metric

    def roles(self) -> dict[str, list[str]]:
        """{"forget": [keys], "retain": [...], "other": [...]}: what run.json records, and what
        reports read to name and order their columns."""
        return {role: self.task_keys(role) for role in ROLES}

    def chance(self, key: str) -> float:
        """Chance accuracy of a task: the mean of 1 / choices over a question file's questions
        (first `limit`), 0.25 for a benchmark (WMDP and MMLU questions have four choices).
        A perplexity task has none (ValueError)."""
        t = self.task(key)
        if t.kind == PPL:
            raise ValueError(f"task {key} is a perplexity task: it has no chance accuracy")
        if t.path is None:
            return 0.25
        rows = take_part(read_question_file(t.path)[1][: t.limit], t.part)
        return sum(1 / len(q["choices"]) for q in rows) / len(rows)


def resolve_suite(
    args: SuiteArgs, world=None, base: str | Path | None = None, require_forget: bool = True
) -> Suite:
    """The suite `args` names, every task checked without loading a dataset or weights.

    `world` supplies the world tasks and the defaults; `base` is where relative question-file
    paths are found (a spec's directory; default the working directory). UsageError, one line,
    for an unknown name, a bad question or document file (FILE:LINE), a key used twice, a
    perplexity task given as a forget or retain task, or no forget task.
    """
    world_tasks = dict(world.questions) if world is not None else {}
    # Of the world only `questions` and `perplexity` are read (an object without the latter,
    # a format-1 world's stand-in, has no perplexity task).
    world_ppl = dict(getattr(world, "perplexity", None) or {})
    if args.given:
        wanted = {role: getattr(args, f"{role}_tasks") for role in ROLES}
    elif world is not None:
        wanted = {role: [] for role in ROLES}
        for name in world_tasks:
            wanted[WORLD_ROLES.get(name, "other")].append(name)
        wanted["other"] += list(world_ppl)  # lower is better: reported, never forget/retain
    else:
        wanted = {role: list(names) for role, names in DEFAULT_BENCHMARKS.items()}
    tasks, registry = [], []
    for role in ROLES:
        for entry in wanted[role]:
            whole, part = split_entry(entry)
            name, limit = parse_entry(whole)
            task = _resolve(name, role, limit or args.eval_limit, world_tasks, world_ppl, base)
            if part is not None:
                task = _part_of(task, part)
            if task.kind == PPL and role != "other":
                raise UsageError(
                    f"task {entry} is a perplexity task (lower is better, not an accuracy): it "
                    f"is reported only, give it as an other task, not a {role} task"
                )
            tasks.append(task)
            if task.kind == "lm-eval":
                registry.append(name)
    task_dirs = tuple(str(_path(d, base).absolute()) for d in args.task_dirs)
    for d in task_dirs:
        if not Path(d).is_dir():
            raise UsageError(f"task folder {d} is not a directory")
    if registry:
        harness.check_task_names(registry, task_dirs)
    keys = [t.key for t in tasks]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise UsageError(f"the evaluation suite names task(s) {repeated} more than once")
    if require_forget and not any(t.role == "forget" for t in tasks):
        raise UsageError("the evaluation suite has no forget task (give --forget_tasks)")
    return Suite(tuple(tasks), args.eval_backend, task_dirs)


def _part_of(task: SuiteTask, part: str) -> SuiteTask:
    """`part` of a resolved task (a file's documents are counted now: a benchmark's when they
    are scored, where too few fail that evaluation)."""
    if task.path is not None:
        docs = read_documents(task.path) if task.kind == PPL else read_question_file(task.path)[1]
        n = len(docs[: task.limit])
        if n < 2:
            raise UsageError(
                f"task {task.source}: {n} document(s) cannot be split into a selection and a"
                " report part"
            )
    return replace(task, key=with_part(task.key, part), part=part)


def _path(name: str, base: str | Path | None) -> Path:
    path = Path(name).expanduser()
    return Path(base) / path if not path.is_absolute() and base is not None else path


def _resolve(
    name: str,
    role: str,
    limit: int | None,
    world_tasks: dict,
    world_ppl: dict,
    base: str | Path | None,
) -> SuiteTask:
    if name in world_ppl:
        path = str(world_ppl[name])
        read_documents(path)  # checked before any weights load, like a question file
        return SuiteTask(name, name, role, PPL, limit, path)
    if name.startswith(PPL_PREFIX):
        path = _path(name[len(PPL_PREFIX) :], base)
        if not path.is_file():
            raise UsageError(f"document file {name[len(PPL_PREFIX) :]} not found (task {name})")
        read_documents(path)
        return SuiteTask(path.stem, name, role, PPL, limit, str(path.absolute()))
    if name in world_tasks:
        path = str(world_tasks[name])
        read_question_file(path)  # checked row by row before any weights load
        return SuiteTask(name, name, role, "world", limit, path)
    path = _path(name, base)
    if path.suffix in QUESTION_SUFFIXES or path.is_file():
        if not path.is_file():
            raise UsageError(f"question file {name} not found")
        kind, _ = read_question_file(path)
        return SuiteTask(path.stem, name, role, kind, limit, str(path.absolute()))
    return SuiteTask(name, name, role, "lm-eval", limit)


# -- scoring ----------------------------------------------------------------------------------


Scorer = Callable[[str], tuple[dict, str | None]]
"""score(task key) -> (numeric metrics, why the result is collapsed or None), for
`ActiveRun.evaluate`."""


@dataclass
class PreparedSuite:
    """A suite whose lm-eval tasks are built and their data loaded, ready for any model."""

    suite: Suite
    prepared: harness.PreparedTasks | None
    """lm-eval's task objects (None when every task is a question file scored natively)."""
    native: frozenset[str]
    """Keys of the lm-eval tasks scored natively (question files always are, unless the backend
    is lm-eval)."""
    num_fewshot: int | None = None
    """Few-shot examples for lm-eval tasks whose config does not fix them (scored by lm-eval)."""

    def via_lm_eval(self, key: str) -> bool:
        t = self.suite.task(key)
        if t.kind == PPL:  # native whatever the backend: lm-eval has no such task
            return False
        if self.suite.backend == "lm-eval":
            return True
        return t.kind == "lm-eval" and key not in self.native

    def score(
        self, model: torch.nn.Module, tokenizer, key: str, batch_size: int = 64,
        progress: bool = False,
    ) -> dict:  # fmt: skip
        """One task's result dict on the live model; raises (HarnessError, ValueError, ...) when
        the evaluation fails, so callers record a failed row."""
        t = self.suite.task(key)
        if self.via_lm_eval(key):
            options = harness.HarnessOptions(batch_size, t.limit, self.num_fewshot, part=t.part)
            results = harness.evaluate_prepared(model, tokenizer, self._only(key), options)
            result = results[key]
            if result.get("status") == "failed":
                raise harness.HarnessError(result["error"])
            return {**result, "backend": "lm-eval"}
        if t.kind == PPL:
            texts = take_part(read_documents(t.path)[: t.limit], t.part)
            result = evaluate_perplexity(model, tokenizer, texts, batch_size, progress, key)
            return {**result, "backend": "native"}
        if t.kind in ("world", CLOZE, LETTER):
            rows = take_part(read_question_file(t.path)[1][: t.limit], t.part)
            questions = as_cloze(rows) if t.kind == LETTER else rows
            special = None if t.kind == LETTER else False  # benchmarks: the tokenizer's default
            result = evaluate_questions(
                model, tokenizer, questions, batch_size, progress, key, special
            )
            if t.kind == LETTER:  # every continuation is one letter: acc_norm is acc
                result = {k: v for k, v in result.items() if not k.startswith("acc_norm")}
            return {**result, "backend": "native"}
        if key in self.prepared.failed:
            raise harness.HarnessError(self.prepared.failed[key])
        obj = self.prepared.objects[key]
        result = score_lm_task(model, tokenizer, obj, t.limit, batch_size, None, progress, t.part)
        return {**result, "backend": "native"}

    def _only(self, key: str) -> harness.PreparedTasks:
        p = self.prepared
        return harness.PreparedTasks(
            objects={k: v for k, v in p.objects.items() if k == key},
            failed={k: v for k, v in p.failed.items() if k == key},
            world_names=p.world_names,
            task_manager=p.task_manager,
        )

    def scorer(
        self, model: torch.nn.Module, tokenizer, batch_size: int = 64, progress: bool = False
    ) -> Scorer:
        """`score(key) -> (metrics, collapsed)` on the live model, for `ActiveRun.evaluate`:
        `collapsed` is why the result is collapsed (`collapse_reason`, truthy), else None."""

        def score(key: str) -> tuple[dict, str | None]:
            result = self.score(model, tokenizer, key, batch_size, progress)
            return numeric_metrics(result), collapse_reason(result)

        return score

    def evaluate(
        self,
        model: torch.nn.Module,
        tokenizer,
        batch_size: int = 64,
        progress: bool = False,
        keys: Sequence[str] | None = None,
    ) -> dict[str, dict]:
        """{key: result dict or {"status": "failed", "error": ...}} for every task (of `keys`)."""
        results = {}
        for key in self.suite.task_keys() if keys is None else keys:
            try:
                results[key] = self.score(model, tokenizer, key, batch_size, progress)
            except (harness.HarnessError, ValueError, RuntimeError) as e:
                results[key] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        return results


def _by_key(prepared: harness.PreparedTasks, whole: dict[str, str]) -> harness.PreparedTasks:
    """lm-eval's tasks, prepared by name, under the suite's keys (`name#part` too)."""
    return harness.PreparedTasks(
        objects={k: prepared.objects[n] for k, n in whole.items() if n in prepared.objects},
        failed={k: prepared.failed[n] for k, n in whole.items() if n in prepared.failed},
        world_names=frozenset(k for k, n in whole.items() if n in prepared.world_names),
        task_manager=prepared.task_manager,
    )


def prepare_suite(suite: Suite, num_fewshot: int | None = None) -> PreparedSuite:
    """Build the suite's lm-eval tasks and load their data (UsageError when a dataset is not
    available offline), decide which are scored natively; no weights are loaded. With
    `num_fewshot` lm-eval tasks are scored by lm-eval (few-shot contexts are its own)."""
    lm_eval_keys = [
        t.key
        for t in suite.tasks
        if t.kind == "lm-eval" or (suite.backend == "lm-eval" and t.kind != PPL)
    ]
    prepared = None
    native: set[str] = set()
    if lm_eval_keys:
        # lm-eval knows a task by its own name: both parts of a task share its task object.
        whole = {key: split_entry(key)[0] for key in lm_eval_keys}
        local = {
            whole.get(t.key, t.key): (CLOZE if t.kind == "world" else t.kind, t.path)
            for t in suite.tasks
            if t.path is not None and t.kind != PPL
        }
        names = list(dict.fromkeys(whole.values()))
        prepared = _by_key(harness.prepare_tasks(names, None, suite.task_dirs, local), whole)
        for key in lm_eval_keys:
            if suite.task(key).kind != "lm-eval" or key not in prepared.objects:
                continue
            problem = native_problem(prepared.objects[key])
            if problem is None and num_fewshot:
                problem = f"{num_fewshot}-shot requested"
            if problem is None and suite.backend != "lm-eval":
                native.add(key)
            elif suite.backend == "native":
                raise UsageError(f"task {key} cannot be scored natively ({problem}); use auto")
    result = PreparedSuite(suite, prepared, frozenset(native), num_fewshot)
    through_lm_eval = [k for k in suite.task_keys() if result.via_lm_eval(k)]
    if through_lm_eval and env_world_size() > 1:
        raise UsageError(
            f"task(s) {through_lm_eval} need lm-eval, which cannot score a live model under "
            "torchrun; evaluate the saved model with `unlearn eval` instead"
        )
    return result
