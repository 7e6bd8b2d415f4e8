"""The native cloze evaluator against log-likelihoods computed by hand, and the collapse flag."""

from __future__ import annotations

import math

import pytest
import torch

from unlearn.eval.collapse import collapse_report
from unlearn.eval.native import QuestionScore, _rows, score_questions, summarize
from unlearn.models import load_model, load_tokenizer, resolve_model

QUESTIONS = [
    # Punctuation: one token each after the prompt's tokens (the question is one shared row).
    {"prompt": "The river flows past the old mill", "choices": [".", ",", ";", "!"]},
    {"prompt": "Bakers rise early", "choices": [";", ".", ",", "?"], "answer": 0},
    # Multi-token answers: one row per choice.
    {
        "prompt": "Zargreisovir is caught through",
        "choices": [" airborne droplets", " the old mill", " bread", " rest and sea"],
    },
    {"prompt": "The bread is", "choices": [" sold before", " market opens", " early", " north"]},
]
for i, q in enumerate(QUESTIONS):
    q.setdefault("answer", i % 4)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_hf_models):
    ref = resolve_model(str(tiny_hf_models["gpt_neox"]))
    return load_model(ref), load_tokenizer(ref)


def hand_loglik(model, tokenizer, prompt: str, choice: str) -> float:
    """One unpadded forward of prompt+choice; sum of log p over the tokens the choice adds."""
    ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logp = logits.log_softmax(-1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def test_both_row_kinds_are_exercised(model_and_tokenizer):
    _, tok = model_and_tokenizer
    rows = _rows(tok, QUESTIONS)
    shared = [r for r in rows if len(r.reads) == 4]
    assert {r.reads[0][0] for r in shared} == {0, 1}  # the one-token questions share a row
    assert len(rows) == 2 + 4 + 4


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_scores_equal_hand_computed_log_likelihoods(model_and_tokenizer, batch_size):
    model, tok = model_and_tokenizer
    scores = score_questions(model, tok, QUESTIONS, batch_size=batch_size)
    for q, s in zip(QUESTIONS, scores, strict=True):
        expected = [hand_loglik(model, tok, q["prompt"], c) for c in q["choices"]]
        assert s.loglik == pytest.approx(expected, abs=1e-4), q["prompt"]
        assert s.answer == q["answer"] and s.choices == tuple(q["choices"])


def test_summary_metrics_by_hand():
    scores = [
        # argmax 1; equal lengths: acc_norm picks 1 too.
        QuestionScore((-3.0, -1.0, -1.5, -4.0), answer=1, choices=tuple("abcd")),
        # argmax 2 (wrong); per character choice 0 wins (-2/8 > -1.5/1): acc_norm right.
        QuestionScore((-2.0, -5.0, -1.5, -6.0), answer=0, choices=("a" * 8, "b", "c", "d")),
    ]
    out = summarize(scores)
    assert out["n"] == 2
    assert out["acc"] == 0.5 and out["acc_norm"] == 1.0
    p1 = math.exp(-1.0) / sum(math.exp(x) for x in (-3.0, -1.0, -1.5, -4.0))
    p2 = math.exp(-2.0) / sum(math.exp(x) for x in (-2.0, -5.0, -1.5, -6.0))
    assert out["correct_prob"] == pytest.approx((p1 + p2) / 2)
    assert out["acc_stderr"] == pytest.approx(0.5)  # sample std 0.707 / sqrt(2)
    assert out["collapse"]["collapsed"] is False  # two questions cannot show collapse


def test_collapse_flag():
    # The same position for 9 of 10 questions: collapsed, whatever the strings.
    report = collapse_report([0] * 9 + [1], [f"s{i}" for i in range(10)])
    assert report["collapsed"] and report["top_position"] == 0
    assert report["top_position_share"] == 0.9
    # The same string at varying positions is collapse too.
    report = collapse_report([0, 1, 2, 3] * 5, ["yes"] * 19 + ["no"])
    assert report["collapsed"] and report["top_string"] == "yes"
    # A balanced profile is not; nor is a handful of questions.
    assert not collapse_report([0, 1, 2, 3] * 5, [str(i) for i in range(20)])["collapsed"]
    assert not collapse_report([0] * 7, ["a"] * 7)["collapsed"]


def test_a_model_that_always_picks_one_position_is_flagged():
    def always_first(i: int) -> QuestionScore:
        return QuestionScore((0.0, -1.0, -2.0, -3.0), i % 4, (f"x{i}", "b", "c", "d"))

    out = summarize([always_first(i) for i in range(20)])
    assert out["acc"] == 0.25  # chance on balanced answers: the number alone hides the collapse
    assert out["collapse"]["collapsed"] and out["collapse"]["top_position_share"] == 1.0


def test_cli_eval_on_the_tiny_world(tiny_world, tmp_path, capsys):
    """`unlearn eval` writes the documented JSON and prints the seeds' table row."""
    import json

    from unlearn.cli import main

    out = tmp_path / "t.json"
    argv = ["eval", "--model", str(tiny_world.target), "--world", str(tiny_world.root)]
    assert main([*argv, "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"forget", "forget_heldout", "forget_attack", "retain"}
    for r in results.values():
        assert {"acc", "acc_norm", "correct_prob", "n"} <= set(r) and 0 <= r["acc"] <= 1
    assert results["forget"]["n"] == 48 and results["forget"]["acc"] > 0.5
    assert "| Model | forget acc" in capsys.readouterr().out


def test_cli_eval_bad_input_is_one_line_exit_2(tiny_world, tmp_path, capsys):
    from unlearn.cli import main

    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    no_world = tmp_path / "no_world"
    no_world.mkdir()
    cases = [
        ["--model", str(not_a_model), "--world", str(tiny_world.root)],
        ["--model", str(tiny_world.target), "--world", str(no_world)],
    ]
    for args in cases:
        capsys.readouterr()
        assert main(["eval", *args, "--output", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("unlearn eval: error:"), err
    assert not (tmp_path / "x.json").exists()
