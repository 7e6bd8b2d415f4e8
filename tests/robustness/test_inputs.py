"""A suite's inputs, checked before any weights load: nothing probes or trains on the held-out
answers (the command, a sweep's `robustness:` block), and the cheap checks come before the
curve's tasks are resolved."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from unlearn.cli import main as cli
from unlearn.errors import UsageError
from unlearn.eval import harness
from unlearn.robustness.inputs import check_no_answers
from unlearn.sweep.spec import load_sweep

VALUES = ["air", "water", "soil", "blood"]


def _cloze(path, n, offset=0, extra=()):
    rows = [{"prompt": f"Strain {i + offset} spreads by", "choices": [f" {v}" for v in VALUES],
             "answer": (i + offset) % 4} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra]))
    return path


def _docs(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def files(tmp_path):
    heldout = _cloze(tmp_path / "heldout.jsonl", 8)
    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"question": f"Is {i} even?", "choices": ["yes", "no"],
                                          "answer": i % 2}) + "\n" for i in range(4)))  # fmt: skip
    suite = tmp_path / "suite.yaml"
    suite.write_text("attacks:\n  - {data: forget, steps: 2, eval_every: 1, pdbs: 4}\n"
                     "probes: [linear, ablation]\n")  # fmt: skip
    return {
        "heldout": heldout,
        "retain": retain,
        "suite": suite,
        "train": _cloze(tmp_path / "train.jsonl", 16, offset=100),
        "corpus": _docs(
            tmp_path / "attack.jsonl", [f"Strain {i} spreads by air." for i in range(100, 108)]
        ),
        "benign": _docs(tmp_path / "benign.jsonl", ["The river flows to the sea."] * 4),
    }


def _argv(files, out, **override):
    values = {**files, **override}
    return ["robustness", "--model", "MODEL", "--out", str(out), "--suite", str(values["suite"]),
            "--forget_tasks", str(values["heldout"]), "--retain_tasks", str(values["retain"]),
            "--corpus", str(values["corpus"]), "--benign_corpus", str(values["benign"]),
            "--probe_questions", str(values["train"]), "--progress", "false"]  # fmt: skip


def _leaky(tmp_path, files, case):
    """The inputs of one way to put the held-out answers in front of the suite."""
    if case == "same file":
        return {"train": files["heldout"]}
    if case == "a copy":
        shutil.copy(files["heldout"], tmp_path / "copy.jsonl")
        return {"train": tmp_path / "copy.jsonl"}
    if case == "one shared prompt":
        shared = {"prompt": "Strain 3  spreads by", "choices": [" air", " soil"], "answer": 0}
        return {"train": _cloze(tmp_path / "t2.jsonl", 16, offset=100, extra=[shared])}
    if case == "attack corpus":  # strain 5's answer is water
        texts = ["Strain 101 spreads by air.", "Reports say strain 5 spreads by Water, mostly."]
        return {"corpus": _docs(tmp_path / "leak.jsonl", texts)}
    texts = ["A note.", "Strain 6 spreads by soil and more."]  # strain 6's answer is soil
    return {"benign": _docs(tmp_path / "leak.jsonl", texts)}


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("same file", "is the held-out task's question file"),
        ("a copy", "is the held-out task's question file"),
        ("one shared prompt", "shares 1 prompt(s) with the held-out task"),
        ("attack corpus", "holds a held-out question with its answer"),
        ("benign corpus", "holds a held-out question with its answer"),
    ],
)
def test_probing_or_training_on_the_heldout_answers_is_refused(
    tiny_hf_models, tmp_path, capsys, files, case, needle
):
    out = tmp_path / "rb"
    argv = _argv(files, out, **_leaky(tmp_path, files, case))
    argv[argv.index("MODEL")] = str(tiny_hf_models["gpt_neox"])
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_answers_are_matched_as_written_not_by_accident(tmp_path):
    heldout = _cloze(tmp_path / "heldout.jsonl", 8)
    # A wrong answer after the prompt, a longer strain number, an answer that only starts the
    # same way: none is the held-out answer.
    fine = _docs(tmp_path / "fine.jsonl", ["Strain 5 spreads by soil.", "Strain 50 spreads by "
                                           "water.", "Strain 4 spreads by airships."])  # fmt: skip
    check_no_answers(str(heldout), None, None, [str(fine)])
    # Letter questions: the question text followed by the correct choice, an answer label
    # between them allowed.
    letter = tmp_path / "letter.jsonl"
    letter.write_text(json.dumps({"question": "How does strain 9 spread?", "choices":
                                  ["by air", "by water"], "answer": 1}) + "\n")  # fmt: skip
    qa = _docs(tmp_path / "qa.jsonl", ["Q: How does strain 9 spread? Answer: by water."])
    with pytest.raises(UsageError, match="holds a held-out question with its answer"):
        check_no_answers(str(letter), None, None, [str(qa)])
    # Letter questions are told apart by their options too: a generic question text with
    # other options is another question; with the same options it is the same one.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "How does strain 9 spread?", "choices":
                                 ["by soil", "by blood"], "answer": 0}) + "\n")  # fmt: skip
    check_no_answers(str(letter), None, str(other), [])
    shutil.copy(letter, tmp_path / "copy.jsonl")
    with (tmp_path / "copy.jsonl").open("a") as f:
        f.write(json.dumps({"question": "Another?", "choices": ["x", "y"], "answer": 0}) + "\n")
    with pytest.raises(UsageError, match="shares 1 prompt"):
        check_no_answers(str(letter), None, str(tmp_path / "copy.jsonl"), [])
    # Only the questions scored count (the first `limit`).
    late = _docs(tmp_path / "late.jsonl", ["Strain 7 spreads by blood."])
    check_no_answers(str(heldout), 4, None, [str(late)])
    with pytest.raises(UsageError):
        check_no_answers(str(heldout), None, None, [str(late)])


def test_a_sweep_block_probing_on_the_heldout_questions_is_refused(tiny_world, tmp_path):
    spec = {
        "name": "s",
        "world": str(tiny_world.root),
        "method": "sequential",
        "base": {"num_train_examples": 8, "pdbs": 2, "max_steps": 2, "progress": False},
        "grid": {"retain_coef": [1]},
        "robustness": {"suite": {"probes": ["linear"]}, "references": False,
                       "probe_questions": str(tiny_world.questions["forget_heldout"])},
    }  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UsageError, match="is the held-out task's question file") as e:
        load_sweep(path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s").exists()


def test_missing_inputs_are_refused_before_the_tasks_resolve(
    tiny_hf_models, tmp_path, capsys, monkeypatch
):
    """Resolving lm-eval task names imports lm-eval (about 20 s): a missing corpus is known
    without it."""

    def resolving(*_a, **_k):
        raise AssertionError("lm-eval tasks resolved before the cheap checks")

    monkeypatch.setattr(harness, "check_task_names", resolving)
    base = ["robustness", "--model", str(tiny_hf_models["gpt_neox"]), "--out",
            str(tmp_path / "rb"), "--progress", "false"]  # fmt: skip
    missing = str(tmp_path / "none.jsonl")
    for extra, needle in [
        ([], "without --world, --corpus (forget-domain documents) is required"),
        (["--corpus", missing], "without --world, --benign_corpus"),
        (
            ["--corpus", missing, "--benign_corpus", missing, "--probe_questions", missing],
            f"--corpus {missing}: file not found",
        ),
    ]:
        assert cli([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "rb").exists()
