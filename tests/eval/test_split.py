"""Task parts (`NAME#select`, `NAME#report`): a deterministic partition of each (sub)task's
documents by index, scored the same natively and through lm-eval, whose two parts add up to the
whole task."""

import json
import random

import pytest

from unlearn.errors import UsageError
from unlearn.eval.split import part_indices, split_entry
from unlearn.eval.suite import SuiteArgs, prepare_suite, resolve_suite
from unlearn.models.load import load_model, load_tokenizer
from unlearn.models.refs import resolve_model

WORDS = ["river", "mill", "bread", "market", "north", "sea", "fever", "rash", "cough", "virus"]


def _rows(rng: random.Random, n: int) -> list[dict]:
    return [{"question": f"Which {rng.choice(WORDS)} is near the {rng.choice(WORDS)}?",
             "choices": [f"the {w}" for w in rng.sample(WORDS, 4)], "answer": rng.randrange(4)}
            for _ in range(n)]  # fmt: skip


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_parts_are_a_fixed_partition_by_index():
    for n in (2, 3, 17, 200):
        select, report = part_indices(n, "select"), part_indices(n, "report")
        assert sorted(select + report) == list(range(n)) and select and report
        assert len(select) == min(n - 1, max(1, round(n / 2)))
        assert select == part_indices(n, "select")  # the same every time
    assert part_indices(8, "select") == [2, 3, 4, 7]  # fixed by the documented order
    # Not the first half: both parts draw from the whole file.
    assert part_indices(200, "select") != list(range(100))
    assert split_entry("mmlu@500#report") == ("mmlu@500", "report")
    assert split_entry("notes#draft") == ("notes#draft", None)
    with pytest.raises(ValueError, match="cannot be split"):
        part_indices(1, "select")


def test_parts_add_up_to_the_task_natively_and_through_lm_eval(tiny_hf_models, tmp_path):
    rng = random.Random(0)
    letter = _jsonl(tmp_path / "local_mc.jsonl", _rows(rng, 13))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for subject, n in (("anatomy", 8), ("astronomy", 11)):
        data = _jsonl(tmp_path / f"{subject}.jsonl", _rows(rng, n))
        (tasks / f"mini_{subject}.yaml").write_text(json.dumps({
            "task": f"mini_{subject}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}"
                           "\nD. {{choices[3]}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }))  # fmt: skip
    (tasks / "mini.yaml").write_text(json.dumps({
        "group": "mini", "task": ["mini_anatomy", "mini_astronomy"],
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
    }))  # fmt: skip
    ref = resolve_model(str(tiny_hf_models["llama"]))
    net, tok = load_model(ref), load_tokenizer(ref)

    def scores(forget, retain, backend):
        args = SuiteArgs(forget_tasks=forget, retain_tasks=retain, task_dirs=[str(tasks)],
                         eval_backend=backend)  # fmt: skip
        suite = resolve_suite(args)
        return suite, prepare_suite(suite).evaluate(net, tok, batch_size=4)

    _, whole = scores([str(letter)], ["mini@10"], "auto")
    parts = [f"{e}#{p}" for e in (str(letter), "mini@10") for p in ("select", "report")]
    suite, native = scores(parts[:2], parts[2:], "auto")
    assert suite.forget == ["local_mc#select", "local_mc#report"]
    assert suite.retain == ["mini#select", "mini#report"]
    _, lm_eval = scores(parts[:2], parts[2:], "lm-eval")
    for key in ("local_mc", "mini"):
        sel, rep = native[f"{key}#select"], native[f"{key}#report"]
        assert sel["n"] + rep["n"] == whole[key]["n"]  # mini: 8 + 10 (the limit per subtask)
        assert sel["acc"] * sel["n"] + rep["acc"] * rep["n"] == pytest.approx(
            whole[key]["acc"] * whole[key]["n"]
        )
        for part in ("select", "report"):  # lm-eval scores the same documents
            theirs = lm_eval[f"{key}#{part}"]
            assert (theirs["n"], theirs["acc"]) == (native[f"{key}#{part}"]["n"],
                                                    native[f"{key}#{part}"]["acc"])  # fmt: skip
    assert whole["mini"]["n"] == 18
    assert suite.chance("local_mc#select") == pytest.approx(0.25)


def test_a_file_too_small_to_split_is_refused(tmp_path):
    one = _jsonl(tmp_path / "one.jsonl", _rows(random.Random(0), 1))
    with pytest.raises(UsageError, match="cannot be split"):
        resolve_suite(SuiteArgs(forget_tasks=[f"{one}#select"]))
