"""What a robustness suite runs on besides the model (`SuiteInputs`), checked before any weights
load, and the key that tells two suites' results apart.

Design choices:
- The cheap checks come first (the corpora a suite needs exist, the probe questions parse):
  resolving the curve's tasks can mean importing lm-eval and reading its task registry (about
  20 s), and a missing `--corpus` must not wait for it.
- Probing on the answers is refused: probe questions sharing a file or any prompt with the
  held-out task, or an attack corpus (local file) holding a held-out question's prompt followed
  by its correct answer, would score what the suite teaches, not what the model kept.
- `SuiteInputs.key()` is a digest of everything besides the model that changes a result: the
  suite, the held-out task and the curve's tasks (question files by content), every attack's
  full run config (seed, dtype, limits, lengths), the corpora and probe questions by content,
  the world (its world.json), the evaluation batch size and, with a quantisation attack, the
  quantisation library's version. Cached references live in a folder named by it and record
  it, with the model's weights identity (`ModelRef.cache_key`), so a reference is reused only
  for the identical comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from unlearn.distributed import env_world_size
from unlearn.errors import UsageError
from unlearn.eval.questions import read_question_file
from unlearn.eval.suite import Suite, SuiteArgs, resolve_suite
from unlearn.models.refs import ModelRef
from unlearn.robustness.quantize import library_version
from unlearn.robustness.readout import LINEAR_TOL
from unlearn.robustness.suite import FinetuneAttack, RobustnessSuite
from unlearn.world import World

WORLD_BENIGN_CORPORA = ("retain", "filler")
"""A benign attack's data on a world: general facts and fact-free text. Not near_domain_retain:
its documents name forget-domain entities, and a benign attack must read none."""
WORLD_CURVE_TASKS = {
    "forget": ["forget_heldout", "forget"],
    "retain": ["retain", "retain_late", "near_domain"],
}
"""The tasks on a world attack's curve: the held-out facts (scored), the unlearned facts
(reported) and every retain task (the utility constraint). forget_attack and perplexity are
left out: each curve point costs their evaluation."""
PROBE_DTYPE = "float32"
"""The dtype the probes load the model in (`models.load.load_model`'s default), part of the key."""


@dataclass(frozen=True)
class SuiteInputs:
    """Everything a suite runs on besides the model, checked before any weights load."""

    suite: RobustnessSuite
    curve: SuiteArgs
    """The evaluation suite of the attack curves."""
    resolved: Suite
    heldout: str
    """The held-out forget task: what the worst case is measured on."""
    unlearned: str | None
    world: World | None = None
    forget_corpus: str | None = None
    benign_corpus: str | None = None
    probe_questions: str | None = None
    eval_batch_size: int = 64
    seed: int = 0
    progress: bool = True

    def attack_overrides(self, attack: FinetuneAttack) -> dict[str, Any]:
        """The attack run's config values besides model, out and ids."""
        values: dict[str, Any] = {**attack.overrides(), "seed": self.seed,
                                  "eval_batch_size": self.eval_batch_size,
                                  "progress": self.progress}  # fmt: skip
        for role in ("forget", "retain", "other"):
            values[f"{role}_tasks"] = list(getattr(self.curve, f"{role}_tasks"))
        values.update(eval_limit=self.curve.eval_limit, eval_backend=self.curve.eval_backend,
                      task_dirs=list(self.curve.task_dirs))  # fmt: skip
        if self.world is not None:
            values["world"] = str(self.world.root)
            if attack.data == "benign":
                values["world_corpora"] = list(WORLD_BENIGN_CORPORA)
        else:
            values["corpus"] = self.forget_corpus if attack.data == "forget" else self.benign_corpus
        return values

    @cached_property
    def _key(self) -> str:
        from unlearn.recipes.attack import build_attack_config  # the attack stack, lazily

        attacks = {}
        for attack in self.suite.attacks:
            values = {**self.attack_overrides(attack), "model": "MODEL", "out": "OUT"}
            config = build_attack_config(values, f"attack {attack.name}").to_dict()
            attacks[attack.name] = {k: v for k, v in config.items()
                                    if k not in ("model", "out", "progress")}  # fmt: skip
        tasks = [[t.key, t.role, t.kind, t.source, t.limit, _digest(t.path)]
                 for t in self.resolved.tasks]  # fmt: skip
        world = None
        if self.world is not None:
            world = [str(self.world.root), _digest(self.world.root / "world.json")]
        payload = {
            "suite": self.suite.to_dict(),
            "heldout": self.heldout,
            "unlearned": self.unlearned,
            "tasks": tasks,
            "backend": self.resolved.backend,
            "task_dirs": list(self.resolved.task_dirs),
            "attacks": attacks,
            "probe_dtype": PROBE_DTYPE,
            # The linear probe's fitting tolerance changes its accuracies a little: a cached
            # reference fitted at another one is not this suite's.
            "linear_tol": LINEAR_TOL,
            "world": world,
            "corpora": [_digest(p) for p in (self.forget_corpus, self.benign_corpus)],
            "probe_questions": _digest(self.probe_questions),
            "eval_batch_size": self.eval_batch_size,
            "seed": self.seed,
        }
        if self.suite.quantize:  # another torchao may round (or pick groups) differently
            payload["quant_library"] = library_version()
        text = json.dumps(payload, sort_keys=True, default=str)
        return f"{self.suite.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def key(self) -> str:
        """SUITE-DIGEST of everything besides the model that changes a result (module doc):
        the name of the references' cache folder, recorded by every robustness run."""
        return self._key

    def result_key(self, ref: ModelRef) -> dict[str, Any]:
        """What a cached result must match to be reused for `ref`: this key and the model's
        weights identity."""
        return {"inputs_key": self.key(), "model_key": json.loads(json.dumps(ref.cache_key()))}


def _digest(path: str | os.PathLike | None) -> str | None:
    """A local file's content digest (a hub name or None as given)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return str(path)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def suite_inputs(
    suite: RobustnessSuite,
    world: World | None = None,
    tasks: SuiteArgs | None = None,
    heldout_task: str | None = None,
    forget_corpus: str | None = None,
    benign_corpus: str | None = None,
    probe_questions: str | None = None,
    eval_batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> SuiteInputs:
    """Check a suite's inputs (UsageError, one line): the attack corpora it needs, the tasks
    of its curves, the held-out task, the probes' questions, and that nothing probes or
    trains on the held-out answers."""
    _check_files(suite, world, forget_corpus, benign_corpus, probe_questions)
    tasks = tasks or SuiteArgs()
    if world is not None and not tasks.given:
        tasks = SuiteArgs(
            forget_tasks=list(WORLD_CURVE_TASKS["forget"]),
            retain_tasks=[t for t in WORLD_CURVE_TASKS["retain"] if t in world.questions],
            eval_limit=suite.eval_limit,
            eval_backend=tasks.eval_backend,
        )
    elif suite.eval_limit is not None and tasks.eval_limit is None:
        tasks = SuiteArgs(**{**tasks.__dict__, "eval_limit": suite.eval_limit})
    resolved = resolve_suite(tasks, world)
    heldout = heldout_task or (
        "forget_heldout" if "forget_heldout" in resolved.forget else resolved.forget[0]
    )
    if heldout not in resolved.forget:
        raise UsageError(f"--heldout_task {heldout} is not a forget task of the curve suite")
    if (suite.attacks or suite.weightless_names()) and not resolved.retain:
        raise UsageError("the utility constraint needs a retain task (give --retain_tasks)")
    unlearned = next((t for t in resolved.forget if t != heldout), None)
    held = resolved.task(heldout)
    if held.path is not None and (
        probe_questions or (world is None and (forget_corpus or benign_corpus))
    ):
        corpora = [c for c in (forget_corpus, benign_corpus) if c] if world is None else []
        check_no_answers(held.path, held.limit, probe_questions, corpora)
    return SuiteInputs(suite, tasks, resolved, heldout, unlearned, world, forget_corpus,
                       benign_corpus, probe_questions, eval_batch_size, seed,
                       progress)  # fmt: skip


def _check_files(
    suite: RobustnessSuite,
    world: World | None,
    forget_corpus: str | None,
    benign_corpus: str | None,
    probe_questions: str | None,
) -> None:
    """The checks that read at most a small file: run before the curve's tasks resolve."""
    from unlearn.data.corpus import CorpusSpec

    if suite.weightless_names() and env_world_size() > 1:
        # Each rank would load, quantise and perturb its own copy and write the same runs.
        raise UsageError(
            "the quantisation and latent attacks run in one process: run the suite without torchrun"
        )
    if suite.quantize:
        library_version()  # the quantisation library is installed and imports, now
    if world is None:
        kinds = {a.data for a in suite.attacks}
        if suite.attack_budget:  # the attack search's data too
            kinds |= set(suite.attack_space.data)
        if ("forget" in kinds or suite.latent is not None) and not forget_corpus:
            raise UsageError("without --world, --corpus (forget-domain documents) is required")
        if ("benign" in kinds or suite.probes) and not benign_corpus:
            raise UsageError("without --world, --benign_corpus (benign documents) is required")
        if {"linear", "lens"} & set(suite.probes) and not probe_questions:
            raise UsageError("without --world, the linear and lens probes need --probe_questions")
    for flag, corpus in (("--corpus", forget_corpus), ("--benign_corpus", benign_corpus)):
        spec = CorpusSpec.parse(corpus) if corpus else None
        if spec is not None and spec.is_local and not Path(spec.source).is_file():
            raise UsageError(f"{flag} {corpus}: file not found")
    if probe_questions:
        if not Path(probe_questions).expanduser().is_file():
            raise UsageError(f"--probe_questions {probe_questions}: file not found")
        read_question_file(probe_questions)  # FILE:LINE for a bad row, now


def _norm(text: str) -> str:
    """Case-folded, whitespace runs made one space: how prompts and documents are compared."""
    return " ".join(text.split()).casefold()


def _asked(row: dict) -> str:
    """What the model is asked: a cloze prompt, or a letter question's text with its options
    (a generic "Which of these is true?" is many questions, told apart by the options)."""
    if "question" in row:
        return _norm(" ".join([row["question"], *map(str, row["choices"])]))
    return _norm(row["prompt"])


def _answer(row: dict) -> str:
    return _norm(str(row["choices"][int(row["answer"])]))


_ANSWER_LABEL = re.compile(r"^(?:answer|a)\s*[:.)-]\s*")
"""A label between a question and its answer in a QA document ("Q? Answer: air")."""


def _leaks(doc: str, prompt: str, answer: str) -> bool:
    """`doc` holds `prompt` followed (after whitespace or an answer label) by `answer` as a
    whole word or phrase."""
    start = doc.find(prompt)
    while start >= 0:
        rest = doc[start + len(prompt) :].lstrip()
        rest = _ANSWER_LABEL.sub("", rest, count=1)
        if answer and rest.startswith(answer):
            after = rest[len(answer) : len(answer) + 1]
            if not after or not after.isalnum():
                return True
        start = doc.find(prompt, start + 1)
    return False


def check_no_answers(
    heldout_path: str,
    limit: int | None,
    probe_questions: str | None,
    corpora: Sequence[str],
) -> None:
    """UsageError when the probe questions share the held-out file (the same path or the same
    content) or any prompt with it, or a local attack corpus holds a held-out question's prompt
    followed by its correct answer: the suite would score the answers it was shown."""
    rows = read_question_file(heldout_path)[1]
    rows = rows[:limit]
    if probe_questions:
        same_file = os.path.samefile(probe_questions, heldout_path)
        if same_file or _digest(probe_questions) == _digest(heldout_path):
            raise UsageError(
                f"--probe_questions {probe_questions} is the held-out task's question file: "
                "the probes would be fitted on the questions they are scored on"
            )
        asked = {_asked(r) for r in rows}
        shared = [r for r in read_question_file(probe_questions)[1] if _asked(r) in asked]
        if shared:
            raise UsageError(
                f"--probe_questions {probe_questions} shares {len(shared)} prompt(s) with the "
                f"held-out task (e.g. {_asked(shared[0])!r}): the probes would be fitted on the "
                "questions they are scored on"
            )
    if not corpora:
        return
    from unlearn.data.corpus import CorpusSpec, load_documents

    for corpus in corpora:
        if not CorpusSpec.parse(corpus).is_local:
            continue  # a hub dataset: not downloaded to be checked (docs/robustness.md)
        # One string, documents apart by a character no prompt holds: one scan per question.
        text = "\0".join(_norm(d) for d in load_documents(corpus))
        for row in rows:
            prompt = _norm(row["question"] if "question" in row else row["prompt"])
            if prompt and _leaks(text, prompt, _answer(row)):
                raise UsageError(
                    f"attack corpus {corpus} holds a held-out question with its answer "
                    f"({prompt!r} followed by {_answer(row)!r}): an attack on it would be "
                    "scored on what it was shown"
                )
