"""The native cloze evaluator against log-likelihoods computed by hand, and the collapse flag."""

from __future__ import annotations

import math

import pytest
import torch

from unlearn.eval.collapse import collapse_reason, collapse_report
from unlearn.eval.encoding import encode_requests, rows_of
from unlearn.eval.native import QuestionScore, score_questions, summarize
from unlearn.models.load import load_model, load_tokenizer
from unlearn.models.refs import resolve_model

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
    requests = [(q["prompt"], c) for q in QUESTIONS for c in q["choices"]]
    rows = rows_of(encode_requests(tok, requests), max_length=None)
    shared = [r for r in rows if len(r.reads) == 4]
    # The one-token questions (requests 0-3 and 4-7) share a row each.
    assert {r.reads[0][0] for r in shared} == {0, 4}
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
    report = collapse_report([0] * 9 + [1], [f"s{i}" for i in range(10)], n_choices=4)
    assert report["collapsed"] and report["top_position"] == 0
    assert report["top_position_share"] == 0.9
    # The same string at varying positions is collapse too.
    report = collapse_report([0, 1, 2, 3] * 5, ["yes"] * 19 + ["no"], n_choices=4)
    assert report["collapsed"] and report["top_string"] == "yes"
    # A balanced profile is not; nor is a handful of questions.
    assert not collapse_report([0, 1, 2, 3] * 5, [str(i) for i in range(20)], 4)["collapsed"]
    assert not collapse_report([0] * 7, ["a"] * 7, n_choices=4)["collapsed"]


def test_collapse_reason_says_what_collapsed():
    position = collapse_report([0] * 9 + [1], [f"s{i}" for i in range(10)], n_choices=4)
    assert collapse_reason({"collapse": position}) == "90% of answers at position 0"
    text = collapse_report([0, 1, 2, 3] * 5, ["yes"] * 19 + ["no"], n_choices=4)
    assert collapse_reason({"collapse": text}) == "95% of answers 'yes'"
    ppl = {"ppl": 312000.0, "collapse": {"collapsed": True, "uniform_ppl": 1024}}
    assert collapse_reason(ppl) == "perplexity 3.12e+05 > e x vocabulary (2.78e+03)"
    assert collapse_reason({"collapse": {"collapsed": False, "uniform_ppl": 1024}}) is None
    assert collapse_reason({"acc": 0.3}) is None


def test_a_model_that_always_picks_one_position_is_flagged():
    def always_first(i: int) -> QuestionScore:
        return QuestionScore((0.0, -1.0, -2.0, -3.0), i % 4, (f"x{i}", "b", "c", "d"))

    out = summarize([always_first(i) for i in range(20)])
    assert out["acc"] == 0.25  # chance on balanced answers: the number alone hides the collapse
    assert out["collapse"]["collapsed"] and out["collapse"]["top_position_share"] == 1.0


def test_cli_eval_on_the_tiny_world(tiny_world, tmp_path, capsys):
    """`unlearn eval` writes the documented JSON and prints the reference campaign's table row."""
    import json

    from unlearn.cli import main

    out = tmp_path / "t.json"
    argv = ["eval", "--model", str(tiny_world.target), "--world", str(tiny_world.root)]
    assert main([*argv, "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {*tiny_world.questions, "general_ppl"}
    ppl = results.pop("general_ppl")  # per-token perplexity on held-out filler: no accuracy
    assert {"ppl", "nll", "tokens", "n"} <= set(ppl) and ppl["ppl"] > 1 and "acc" not in ppl
    for r in results.values():
        assert {"acc", "acc_norm", "correct_prob", "n"} <= set(r) and 0 <= r["acc"] <= 1
    assert results["forget"]["n"] == 48 and results["forget"]["acc"] > 0.5
    printed = capsys.readouterr().out
    assert "| Model | forget acc" in printed and "general ppl (↓) |" in printed


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


def test_collapse_check_counts_the_questions_choices():
    """Three-choice (and two-choice) questions: the collapse check uses their own number of
    choices, not an assumed four (6 three-choice questions are enough to show collapse)."""

    def always_first(i: int, n: int) -> QuestionScore:
        return QuestionScore(
            tuple(-float(k) for k in range(n)), i % n, tuple(f"c{k}" for k in range(n))
        )

    for n in (2, 3):
        out = summarize([always_first(i, n) for i in range(2 * n)])
        assert out["acc"] == pytest.approx(1 / n)
        assert out["collapse"]["collapsed"], n
    mixed = summarize([always_first(0, 3), always_first(1, 2)] * 3)
    assert mixed["collapse"]["collapsed"]


def test_scoring_rejects_questions_it_cannot_score(model_and_tokenizer):
    """A negative answer would index from the end (a silent wrong number): refused."""
    model, tok = model_and_tokenizer
    for bad, match in (
        ({"answer": -1}, "answer -1"),
        ({"answer": 4}, "answer 4"),
        ({"choices": [" only"], "answer": 0}, "at least 2 choices"),
    ):
        with pytest.raises(ValueError, match=match):
            score_questions(model, tok, [QUESTIONS[0], {**QUESTIONS[1], **bad}])


def _eval_argv(world_root, output) -> list[str]:
    return ["eval", "--model", "models/target", "--world", str(world_root), "--output", str(output)]


def test_three_choice_questions_end_to_end(tiny_world, tmp_path):
    """Every question file reduced to three choices (one wrong choice dropped): `unlearn eval`
    scores them; dropping a wrong choice can only raise acc and raises correct_prob."""
    import json

    from tiny_models import linked_world_copy
    from unlearn.cli import main

    root = linked_world_copy(tiny_world, tmp_path / "w3")
    for path in tiny_world.questions.values():
        rows = []
        for q in (json.loads(line) for line in path.read_text().splitlines()):
            drop = (q["answer"] + 1) % len(q["choices"])
            choices = [c for k, c in enumerate(q["choices"]) if k != drop]
            rows.append(
                {**q, "choices": choices, "answer": choices.index(q["choices"][q["answer"]])}
            )
        (root / path.relative_to(tiny_world.root)).write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    assert main(_eval_argv(tiny_world.root, tmp_path / "four.json")) == 0
    assert main(_eval_argv(root, tmp_path / "three.json")) == 0
    four = json.loads((tmp_path / "four.json").read_text())["results"]
    three = json.loads((tmp_path / "three.json").read_text())["results"]
    for task, r in three.items():
        assert r["n"] == four[task]["n"]
        if task == "general_ppl":  # the same documents: the same perplexity
            assert r["ppl"] == four[task]["ppl"]
            continue
        assert four[task]["acc"] <= r["acc"] <= 1
        assert r["correct_prob"] > four[task]["correct_prob"]
        assert r["collapse"]["collapsed"] is False


def _no_weights(*args, **kwargs):
    raise AssertionError("weights loaded before the input was validated")


BAD_QUESTION_LINES = {
    # second line of the forget file -> expected words of the one-line error
    '{"prompt": "P", "choices": [" a", " b"], "answer": -1}': "answer -1",
    '{"prompt": "P", "choices": [" a", " b", " c"], "answer": 7}': "answer 7",
    '{"prompt": "P", "choices": [" a", " b"], "answer": true}': "answer must be an integer",
    '{"prompt": "P", "choices": [" a"], "answer": 0}': "at least 2 choices",
    '{"prompt": "P", "choices": [" a", " a"], "answer": 0}': "repeated",
    '{"choices": [" a", " b"], "answer": 0}': "missing field 'prompt'",
    '{"prompt": "P", "choices": " a b", "answer": 0}': "choices must be a list",
    '{"prompt": "P", "choices": [" a", " b"], "answer": 0': "not valid JSON",
    '["P", [" a", " b"], 0]': "a JSON object",
}


def test_bad_question_files_are_one_line_exit_2_before_weights_load(
    tiny_world, tmp_path, capsys, monkeypatch
):
    from tiny_models import linked_world_copy
    from unlearn.cli import main

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", _no_weights)
    root = linked_world_copy(tiny_world, tmp_path / "w")
    forget = root / tiny_world.questions["forget"].relative_to(tiny_world.root)
    good = forget.read_text().splitlines(keepends=True)
    # File content -> words of the one-line error; the bad line is always line 2.
    cases: dict[bytes, str] = {
        (good[0] + line + "\n" + "".join(good[1:])).encode(): words
        for line, words in BAD_QUESTION_LINES.items()
    }
    cases[good[0].encode() + b'{"prompt": "caf\xe9"}\n'] = "not UTF-8"
    for content, words in cases.items():
        forget.write_bytes(content)
        capsys.readouterr()
        assert main(_eval_argv(root, tmp_path / "out.json")) == 2, words
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and f"{forget}:2:" in err[0], (words, err)
    for empty in (b"", b"\n\n"):
        forget.write_bytes(empty)
        assert main(_eval_argv(root, tmp_path / "out.json")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{forget}: no questions" in err[0], err
    assert not (tmp_path / "out.json").exists()


def test_eval_output_that_is_a_directory_fails_before_weights_load(
    tiny_world, tmp_path, capsys, monkeypatch
):
    from unlearn.cli import main

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", _no_weights)
    assert main(_eval_argv(tiny_world.root, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a directory" in err[0], err


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_a_right_padded_batch_reads_each_rows_own_logits(family):
    """The evaluators run right-padded rows with no attention mask (as lm-eval does): at every
    real position a row's logits are those of the row run alone, whatever pads follow it."""
    from tiny_models import tiny_gpt_neox, tiny_llama
    from unlearn.eval.native import right_padded_forward

    model = (tiny_gpt_neox if family == "gpt_neox" else tiny_llama)()
    rows = [[5, 9, 2, 7, 11, 3], [4, 8], [6, 1, 12, 30]]
    ids = torch.zeros((len(rows), 6), dtype=torch.long)  # pad id 0 after each row
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
    with torch.no_grad():
        batch = right_padded_forward(model, ids).logits
        for b, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row])).logits[0]
            torch.testing.assert_close(batch[b, : len(row)], alone, rtol=1e-5, atol=1e-5)
