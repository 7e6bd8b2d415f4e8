"""Evaluation suites: parsing, defaults, bad input, and native == lm-eval on every task kind.

Offline: tiny random GPT-NeoX and Llama models (tests/conftest.py `tiny_hf_models`), local
question files in both schemas, and local lm-eval task folders in the MMLU format (a group of
subject subtasks) and the bundled WMDP-Bio-Robust format (a group over its topic subtasks).
"""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from unlearn.errors import UsageError
from unlearn.eval.harness import HarnessError
from unlearn.eval.letter import letter_prompt
from unlearn.eval.suite import SuiteArgs, prepare_suite, resolve_suite
from unlearn.eval.tasks import TASKS_DIR
from unlearn.models.load import load_model, load_tokenizer
from unlearn.models.refs import resolve_model

WORDS = [
    "river", "mill", "bread", "market", "north", "sea", "fever",
    "rash", "cough", "virus", "cell", "gene", "host", "lab",
]  # fmt: skip


def _question(rng: random.Random, n_choices: int = 4) -> dict:
    words = rng.sample(WORDS, 5)
    return {
        "question": f"Which {words[0]} is near the {words[1]}?",
        "choices": [f"the {w}" for w in rng.sample(WORDS, n_choices)],
        "answer": rng.randrange(n_choices),
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Question files of both schemas and local lm-eval task folders over the same rows."""
    root = tmp_path_factory.mktemp("suite")
    rng = random.Random(0)
    letter = [_question(rng) for _ in range(24)] + [_question(rng, 3) for _ in range(4)]
    cloze = [
        {"prompt": f"The {a} is near the", "choices": [f" {b}", f" {c}", f" {d}"], "answer": i % 3}
        for i, (a, b, c, d) in enumerate(rng.sample(WORDS, 4) for _ in range(12))
    ]
    files = SimpleNamespace(
        letter=write_jsonl(root / "mmlu_local.jsonl", letter),
        cloze=write_jsonl(root / "cloze_local.jsonl", cloze),
    )
    tasks = root / "tasks"
    tasks.mkdir()
    # The MMLU format: subjects as subtasks with a description line, a size-weighted group.
    template = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}"
    for i, subject in enumerate(("anatomy", "astronomy")):
        rows = write_jsonl(root / f"{subject}.jsonl", [_question(rng) for _ in range(10 + 6 * i)])
        about = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        cfg = {
            "task": f"mini_mmlu_{subject}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(rows)}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "description": about,
            "doc_to_text": template + "\nD. {{choices[3]}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }  # fmt: skip
        (tasks / f"mini_mmlu_{subject}.yaml").write_text(json.dumps(cfg))
    group = {
        "group": "mini_mmlu",
        "task": ["mini_mmlu_anatomy", "mini_mmlu_astronomy"],
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
    }
    (tasks / "mini_mmlu.yaml").write_text(json.dumps(group))
    # The bundled WMDP-Bio-Robust subtasks, reading a local copy (two topics).
    topics = ("dual_use_virology", "viral_vector_research")
    for topic in topics:
        rows = write_jsonl(root / f"{topic}.jsonl", [_question(rng) for _ in range(9)])
        cfg = {
            "task": f"mini_robust_{topic}",
            "include": str(TASKS_DIR / f"wmdp_bio_robust_{topic}.yaml"),
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"robust": str(rows)}},
        }  # fmt: skip
        (tasks / f"mini_robust_{topic}.yaml").write_text(json.dumps(cfg))
    robust = {
        "group": "mini_robust",
        "task": [f"mini_robust_{t}" for t in topics],
        "aggregate_metric_list": [
            {"metric": m, "aggregation": "mean", "weight_by_size": True}
            for m in ("acc", "correct_prob")
        ],
    }
    (tasks / "mini_robust.yaml").write_text(json.dumps(robust))
    files.tasks = tasks
    return files


def test_defaults_without_a_world():
    assert resolve_suite(SuiteArgs(), None).roles() == {
        "forget": ["wmdp_bio_robust"],
        "retain": ["mmlu"],
        "other": [],
    }


def test_world_default_roles(tiny_world):
    suite = resolve_suite(SuiteArgs(), tiny_world)
    assert suite.roles() == {
        "forget": ["forget", "forget_heldout"],
        "retain": ["retain", "retain_late", "near_domain"],
        "other": ["forget_attack", "general_ppl"],
    }
    assert [t.kind for t in suite.tasks] == ["world"] * 6 + ["ppl"]


def test_entries_limits_and_files(data):
    args = SuiteArgs(
        forget_tasks=[f"{data.letter}@5"], retain_tasks=["mmlu,mmlu_stem@3"], eval_limit=7
    )
    suite = resolve_suite(args)
    forget = suite.task("mmlu_local")
    assert (forget.kind, forget.limit, forget.role) == ("letter", 5, "forget")
    assert suite.task("mmlu").limit == 7 and suite.task("mmlu_stem").limit == 3
    assert resolve_suite(SuiteArgs(forget_tasks=[str(data.cloze)])).task("cloze_local").kind == (
        "cloze"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (dict(forget_tasks=["no_such_task_anywhere"]), "unknown task"),
        (dict(forget_tasks=["missing.jsonl"]), "not found"),
        (dict(retain_tasks=["mmlu"]), "no forget task"),
        (dict(forget_tasks=["mmlu@0"]), "must be >= 1"),
        (dict(forget_tasks=["mmlu"], eval_limit=0), "--eval_limit"),
        (dict(forget_tasks=["mmlu"], retain_tasks=["mmlu"]), "more than once"),
        (dict(forget_tasks=["mmlu"], eval_backend="fast"), "--eval_backend"),
    ],
)
def test_bad_suites_are_one_line_usage_errors(args, message):
    with pytest.raises(UsageError, match=message):
        resolve_suite(SuiteArgs(**args))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "Q?", "choices": ["a", "b"]}, "missing field 'answer'"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": 2}, "not an index"),
        ({"question": "Q?", "choices": ["a"], "answer": 0}, "at least 2 choices"),
        ({"prompt": "P", "choices": [" a", " b"], "answer": 0}, "missing field 'question'"),
    ],
)
def test_a_bad_row_names_file_and_line(tmp_path, row, message):
    good = {"question": "Q?", "choices": ["a", "b"], "answer": 0}
    path = write_jsonl(tmp_path / "q.jsonl", [good, row])
    with pytest.raises(UsageError, match=rf"q.jsonl:2: .*{message}"):
        resolve_suite(SuiteArgs(forget_tasks=[str(path)]))


def test_letter_prompt_is_the_mmlu_template():
    doc = {"question": " Where? ", "choices": ["x", "y", "z"], "answer": 0}
    assert letter_prompt(doc) == "Where?\nA. x\nB. y\nC. z\nAnswer:"


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def model(request, tiny_hf_models):
    ref = resolve_model(str(tiny_hf_models[request.param]))
    return load_model(ref), load_tokenizer(ref)


def test_native_equals_lm_eval_on_every_kind(model, data):
    """Letter and cloze files, an MMLU-format group and a WMDP-Bio-Robust-format group: the native
    path gives lm-eval's accuracy exactly (and p(correct) to float precision)."""
    net, tok = model
    args = dict(
        forget_tasks=["mini_robust", str(data.cloze)],
        retain_tasks=["mini_mmlu@12", str(data.letter)],
        task_dirs=[str(data.tasks)],
    )
    native = prepare_suite(resolve_suite(SuiteArgs(**args)))
    assert native.native == {"mini_robust", "mini_mmlu"}  # nothing falls back to lm-eval
    lm = prepare_suite(resolve_suite(SuiteArgs(**args, eval_backend="lm-eval")))
    ours = native.evaluate(net, tok, batch_size=5)
    theirs = lm.evaluate(net, tok, batch_size=5)
    for key in ("mini_robust", "cloze_local", "mini_mmlu", "mmlu_local"):
        assert ours[key]["n"] == theirs[key]["n"], key
        assert ours[key]["acc"] == theirs[key]["acc"], key
        assert ours[key]["acc_stderr"] == pytest.approx(theirs[key]["acc_stderr"]), key
        if "correct_prob" in theirs[key]:
            assert ours[key]["correct_prob"] == pytest.approx(theirs[key]["correct_prob"], abs=1e-5)
    assert ours["mini_mmlu"]["n"] == 10 + 12  # the limit applies per subtask, as in lm-eval
    assert set(ours["mmlu_local"]) >= {"acc", "correct_prob", "collapse"}


def test_a_failed_task_is_a_failed_entry_not_a_number(model, data, monkeypatch):
    net, tok = model
    prepared = prepare_suite(resolve_suite(SuiteArgs(forget_tasks=[str(data.letter)])))

    def broken(*args, **kwargs):
        raise HarnessError("boom")

    monkeypatch.setattr("unlearn.eval.suite.evaluate_questions", broken)
    assert prepared.evaluate(net, tok)["mmlu_local"] == {
        "status": "failed",
        "error": "HarnessError: boom",
    }
