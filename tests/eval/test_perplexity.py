"""Perplexity: the evaluator against a plain per-document loop, its windows, document files, and
perplexity tasks in suites (a world's general_ppl, `ppl:PATH`), always reported only."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from tiny_models import tiny_llama
from unlearn.errors import UsageError
from unlearn.eval.perplexity import _windows, evaluate_perplexity, read_documents
from unlearn.eval.suite import SuiteArgs, prepare_suite, resolve_suite
from unlearn.models.load import load_model, load_tokenizer
from unlearn.models.refs import resolve_model
from unlearn.runs.rows import eval_rows
from unlearn.world import evaluate_world

TEXTS = [
    "The river flows past the old mill towards the sea.",
    "Bakers rise early.",
    "Zargreisovir is caught through airborne droplets and treated with rest in the north.",
    "Bread",
]


@pytest.fixture(scope="module")
def llama(tiny_hf_models):
    """A random 3-block Llama (context window 2048) and the tiny BPE tokenizer (EOS only)."""
    ref = resolve_model(str(tiny_hf_models["llama"]))
    return load_model(ref).eval(), load_tokenizer(ref)


def by_hand(model, tokenizer, texts, prefix):
    """exp(token-weighted mean of each document's own HF loss): one unpadded forward per
    document, the prefix token first, every document token a label."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[prefix, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
            n = ids.shape[1] - 1
            total += model(input_ids=ids, labels=ids).loss.item() * n
            count += n
    return math.exp(total / count), count


def test_general_ppl_equals_a_plain_loop_over_documents(llama):
    model, tok = llama
    expected, tokens = by_hand(model, tok, TEXTS, tok.eos_token_id)  # no BOS: EOS is the prefix
    got = evaluate_perplexity(model, tok, TEXTS, batch_size=4)
    assert got["ppl"] == pytest.approx(expected, rel=1e-6)
    assert got["nll"] == pytest.approx(math.log(expected), rel=1e-6)
    assert (got["tokens"], got["n"]) == (tokens, len(TEXTS))
    # Batching (padding, order) does not change the number.
    for batch_size in (1, 3):
        again = evaluate_perplexity(model, tok, TEXTS, batch_size=batch_size)["ppl"]
        assert again == pytest.approx(got["ppl"], rel=1e-6)


def test_the_prefix_is_bos_when_the_tokenizer_has_one(llama):
    model, tok = llama
    tok = copy.deepcopy(tok)
    tok.bos_token = tok.convert_ids_to_tokens(7)
    expected, _ = by_hand(model, tok, TEXTS, 7)
    assert evaluate_perplexity(model, tok, TEXTS)["ppl"] == pytest.approx(expected, rel=1e-6)
    eos, _ = by_hand(model, tok, TEXTS, tok.eos_token_id)
    assert not math.isclose(expected, eos, rel_tol=1e-6)  # the prefix is really BOS


def test_windows_predict_every_token_once():
    windows = _windows(list(range(10)), 4)
    assert windows == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert [t for w in windows for t in w[1:]] == list(range(1, 10))
    assert _windows([0, 1], 4) == [[0, 1]]


def test_a_document_longer_than_the_context_is_scored_in_windows(tiny_hf_models):
    """A 64-position Llama on a ~150-token document: consecutive windows of 64 inputs, each
    scored in its own forward by hand, give the evaluator's number."""
    tok = load_tokenizer(resolve_model(str(tiny_hf_models["llama"])))
    model = tiny_llama(layers=2, vocab=len(tok))
    text = " ".join(TEXTS * 6)
    ids = [tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    assert len(ids) > 2 * 64 + 1
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 64):
            window = torch.tensor(ids[start : start + 65])
            logits = model(input_ids=window[None, :-1]).logits[0]
            total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
    got = evaluate_perplexity(model, tok, [text, "Bakers rise early."], batch_size=2)
    short = [tok.eos_token_id, *tok("Bakers rise early.", add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        x = torch.tensor([short])
        total += model(input_ids=x, labels=x).loss.item() * (len(short) - 1)
    assert got["tokens"] == len(ids) - 1 + len(short) - 1
    assert got["nll"] == pytest.approx(total / got["tokens"], rel=1e-6)


def test_document_files(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "one", "id": 1}\n\n{"text": "two\\n\\nstill two"}\n')
    assert read_documents(jsonl) == ["one", "two\n\nstill two"]
    txt = tmp_path / "docs.txt"
    txt.write_text("first line\nsame doc\n\n  \nsecond doc\r\n\r\nthird\n")
    assert read_documents(txt) == ["first line\nsame doc", "second doc", "third"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2: .*no field 'text'"):
        read_documents(bad)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UsageError, match="no documents"):
        read_documents(tmp_path / "empty.txt")


@pytest.fixture
def ppl_world(tiny_world, tmp_path):
    """The tiny world with a held-out document file as its general_ppl task (as a format-2
    world has)."""
    path = tmp_path / "filler_heldout.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return dataclasses.replace(tiny_world, perplexity={"general_ppl": path})


def test_a_worlds_perplexity_task_is_reported_only(ppl_world):
    suite = resolve_suite(SuiteArgs(), ppl_world)
    assert suite.roles()["other"] == ["forget_attack", "general_ppl"]
    assert suite.task("general_ppl").kind == "ppl" and suite.metric("general_ppl") == "ppl"
    assert suite.metric("forget") == "acc"
    bad = {
        "forget": SuiteArgs(forget_tasks=["forget", "general_ppl"]),
        "retain": SuiteArgs(forget_tasks=["forget"], retain_tasks=["general_ppl@2"]),
    }
    for role, args in bad.items():
        with pytest.raises(UsageError, match=f"general_ppl.* perplexity task.*not a {role} task"):
            resolve_suite(args, ppl_world)


def test_a_ppl_file_task_on_a_tiny_llama(llama, tmp_path):
    """`ppl:PATH` (a .txt of blank-line-separated documents) in --other_tasks of a suite with no
    world: scored natively even with the lm-eval backend, its numbers in the eval rows."""
    model, tok = llama
    docs = tmp_path / "held_out.txt"
    docs.write_text("\n\n".join(TEXTS) + "\n")
    forget = tmp_path / "f.jsonl"
    forget.write_text(json.dumps({"prompt": "The river", "choices": [" a", " b"], "answer": 0}))
    for backend in ("auto", "lm-eval"):
        args = SuiteArgs(
            forget_tasks=[str(forget)], other_tasks=[f"ppl:{docs}@3"], eval_backend=backend
        )
        prepared = prepare_suite(resolve_suite(args))
        assert not prepared.via_lm_eval("held_out")
        result = prepared.score(model, tok, "held_out", batch_size=2)
        expected, tokens = by_hand(model, tok, TEXTS[:3], tok.eos_token_id)
        assert result["ppl"] == pytest.approx(expected, rel=1e-6)
        assert (result["n"], result["tokens"], result["backend"]) == (3, tokens, "native")
    metrics, collapsed = prepared.scorer(model, tok)("held_out")
    assert set(metrics) == {"ppl", "nll", "tokens"} and not collapsed
    # Past a uniform guess by a nat per token: a collapsed evaluation (`ActiveRun.evaluate` marks
    # an unlearning run collapsed).
    sure = copy.deepcopy(model)
    with torch.no_grad():
        sure.get_output_embeddings().weight.mul_(500.0)
    metrics, collapsed = prepared.scorer(sure, tok)("held_out")
    assert collapsed and metrics["ppl"] > math.e * model.config.vocab_size
    assert collapsed.startswith(f"perplexity {metrics['ppl']:.3g} > e x vocabulary")
    rows = eval_rows(0, "held_out", metrics)  # what run directories and the store record
    assert {r.metric for r in rows} == {"ppl", "nll", "tokens"}
    with pytest.raises(UsageError, match="not a retain task"):
        resolve_suite(SuiteArgs(forget_tasks=[str(forget)], retain_tasks=[f"ppl:{docs}"]))
    with pytest.raises(UsageError, match=r"document file missing\.txt not found"):
        resolve_suite(SuiteArgs(forget_tasks=[str(forget)], other_tasks=["ppl:missing.txt"]))


def test_evaluate_world_adds_the_worlds_perplexity_tasks(ppl_world):
    """The world build's baseline table: accuracies and general_ppl side by side."""
    ref = resolve_model(ppl_world.target)
    model, tok = load_model(ref), load_tokenizer(ref)
    results = evaluate_world(model, tok, ppl_world, limit=3)
    assert list(results) == [
        "forget", "forget_heldout", "forget_attack", "retain", "retain_late", "near_domain",
        "general_ppl",
    ]  # fmt: skip
    assert results["general_ppl"]["n"] == 3 and "acc" not in results["general_ppl"]
    direct = evaluate_perplexity(model, tok, TEXTS[:3])
    assert results["general_ppl"]["ppl"] == pytest.approx(direct["ppl"], rel=1e-9)
    assert list(evaluate_world(model, tok, ppl_world, ["general_ppl"])) == ["general_ppl"]
    with pytest.raises(KeyError, match="no task 'nope'"):
        evaluate_world(model, tok, ppl_world, ["nope"])


def test_unlearn_eval_prints_a_ppl_task_as_a_number(tiny_hf_models, tmp_path, capsys):
    """`unlearn eval --tasks ppl:FILE` on a tiny random Llama: the table's ppl column is a
    number under a (↓) header, the JSON carries ppl, nll, tokens and n."""
    from unlearn.cli import main

    docs = tmp_path / "held_out.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(tiny_hf_models["llama"]), "--tasks", f"ppl:{docs}"]
    assert main([*argv, "--output", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| Model | Held Out ppl (↓) |"
    cell = table[2].split("|")[2].strip()
    assert "%" not in cell and float(cell) > 1 and cell == f"{float(cell):.2f}"
    result = json.loads(out.read_text())["results"]["held_out"]
    assert set(result) >= {"ppl", "nll", "tokens", "n"} and result["n"] == len(TEXTS)


def test_perplexity_past_a_uniform_guess_is_collapse(llama):
    model, tok = llama
    vocab = model.config.vocab_size
    random_init = evaluate_perplexity(model, tok, TEXTS)
    # A random model guesses near uniformly: near the vocabulary size, not collapsed.
    assert random_init["ppl"] < math.e * vocab
    assert random_init["collapse"] == {"collapsed": False, "uniform_ppl": vocab}
    # Confident and wrong (the head's logits scaled up): far past a uniform guess.
    sure = copy.deepcopy(model)
    with torch.no_grad():
        sure.get_output_embeddings().weight.mul_(500.0)
    broken = evaluate_perplexity(sure, tok, TEXTS)
    assert broken["ppl"] > math.e * vocab
    assert broken["collapse"]["collapsed"] is True
