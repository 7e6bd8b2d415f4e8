"""Model cards: every saved model directory holds a README.md in the hub's model-card format
(base model, method, config, data, the evaluation suite's results, the robustness worst case
once run, the tool's version), rewritten only where the tool wrote it."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from unlearn.cli import main as cli
from unlearn.fsutil import read_jsonl
from unlearn.models.card import CardFacts, CardResult, card_run, render_card, tool_version
from unlearn.runs.cards import write_cards
from unlearn.runs.rundir import RunDir


@pytest.fixture(scope="module")
def lora_run(tiny_world, tmp_path_factory):
    """One step of sequential LoRA unlearning, saved as OUT/adapter and the merged OUT/model."""
    out = tmp_path_factory.mktemp("card") / "run"
    rc = cli(["run", "--method", "sequential", "--world", str(tiny_world.root), "--out", str(out),
              "--max_steps", "1", "--num_phases", "1", "--pdbs", "2", "--grad_accum", "1",
              "--num_train_examples", "4", "--lora", "true", "--progress", "false"])  # fmt: skip
    assert rc == 0
    return out


def _final_rows(out):
    rows = read_jsonl(out / "evals.jsonl")
    step = max(r["step"] for r in rows)
    return step, [r for r in rows if r["step"] == step]


def test_a_run_saves_a_card_with_base_model_method_config_and_results(tiny_world, lora_run):
    card = ModelCard.load(lora_run / "model" / "README.md")
    meta = card.data.to_dict()
    ours = meta["unlearn"]
    # The world's target is a local directory: named in the card, never as the hub's
    # base_model (the hub takes only repository ids there).
    assert ours["base_model"] == str(tiny_world.target) and "base_model" not in meta
    assert (ours["run"], ours["kind"], ours["method"]) == ("run", "unlearn", "sequential")
    assert ours["status"] == "done" and ours["version"] == tool_version()
    assert ours["data"]["forget"] == "the world's forget_unlearn corpus"
    assert "robustness" not in ours  # no suite has run on this model yet
    assert meta["library_name"] == "transformers" and "sequential" in meta["tags"]
    assert "unlearn" in meta["tags"]

    # model-index holds every numeric result of the final evaluation, as evals.jsonl does.
    step, rows = _final_rows(lora_run)
    expected = {(r["task"], r["metric"]): r["value"] for r in rows if r["metric"] != "tokens"}
    got = {(e.dataset_name, e.metric_type): e.metric_value for e in card.data.eval_results}
    assert got == pytest.approx(expected)

    text = card.text
    config = json.loads((lora_run / "run.json").read_text())["config"]
    assert f"`{tiny_world.target}`" in text and "method: `sequential`" in text
    assert f'"retain_coef": {config["retain_coef"]}' in text  # the whole config, as run.json
    assert f"The evaluation suite at step {step}:" in text
    acc = next(r for r in rows if r["task"] == "forget_heldout" and r["metric"] == "acc")
    assert f"| forget_heldout | forget | acc | {acc['value']:.4g} |" in text
    assert f"`unlearn` {tool_version()}" in text

    # The adapter's card says what it is (a PEFT adapter) and carries the same results.
    adapter = ModelCard.load(lora_run / "adapter" / "README.md")
    assert adapter.data.library_name == "peft"
    assert len(adapter.data.eval_results) == len(card.data.eval_results)


def test_an_attack_that_saves_its_model_gets_a_card(tiny_world, tmp_path):
    out = tmp_path / "attack"
    rc = cli(["attack", "--model", str(tiny_world.filtered), "--world", str(tiny_world.root),
              "--out", str(out), "--max_steps", "2", "--eval_every", "2", "--pdbs", "4",
              "--save_model", "true", "--progress", "false"])  # fmt: skip
    assert rc == 0
    card = ModelCard.load(out / "model" / "README.md")
    ours = card.data.to_dict()["unlearn"]
    assert ours["kind"] == "attack" and ours["base_model"] == str(tiny_world.filtered)
    assert ours["data"]["training corpus"] == "the world's forget_attack"
    assert "tamper-attack" in card.data.tags
    # The curve's last point is the saved model's evaluation.
    _, rows = _final_rows(out)
    assert "The evaluation suite at step 2:" in card.text
    assert {e.dataset_name for e in card.data.eval_results} == {r["task"] for r in rows}


def test_robustness_on_a_runs_model_adds_the_worst_case(tiny_world, lora_run, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("probes: [ablation]\neval_limit: 24\n")
    model = lora_run / "model"
    before = ModelCard.load(model / "README.md").data.eval_results
    rc = cli(["robustness", "--model", str(model), "--world", str(tiny_world.root), "--out",
              str(tmp_path / "rb"), "--suite", str(suite), "--cache", str(tmp_path / "cache"),
              "--progress", "false"])  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "rb" / "robustness.json").read_text())
    row = report["models"][report["model"]]
    card = ModelCard.load(model / "README.md")
    rb = card.data.to_dict()["unlearn"]["robustness"]
    assert rb["complete"] is True and rb["worst_case"] == row["worst_case"]
    assert rb["gap_to_filtered"] == pytest.approx(row["gap_to_filtered"])
    assert rb["heldout_task"] == "forget_heldout" and rb["run"] == str(tmp_path / "rb")
    assert f"- worst case: {100 * row['worst_case']:.2f}%" in card.text
    assert f"{100 * row['gap_to_filtered']:+.2f} points" in card.text
    metrics = {e.metric_type: e.metric_value for e in card.data.eval_results}
    assert metrics["worst_case_acc"] == row["worst_case"]
    assert len(card.data.eval_results) == len(before) + 2
    # The adapter is the same model: its card says the same.
    assert ModelCard.load(lora_run / "adapter" / "README.md").data.to_dict()["unlearn"][
        "robustness"
    ] == rb  # fmt: skip

    # Rewriting the card from the run directory keeps the worst case.
    write_cards(lora_run)
    assert ModelCard.load(model / "README.md").data.to_dict()["unlearn"]["robustness"] == rb


def test_a_failed_evaluation_is_a_word_in_the_card(tiny_world, tmp_path, monkeypatch):
    """The card is rewritten when the run ends: status failed, the failed task a word."""
    import unlearn.eval.suite as suite

    real = suite.evaluate_questions

    def evaluate_questions(model, tokenizer, questions, batch_size, progress, task, *args):
        if task == "forget_heldout":
            raise RuntimeError("scorer crashed")
        return real(model, tokenizer, questions, batch_size, progress, task, *args)

    monkeypatch.setattr(suite, "evaluate_questions", evaluate_questions)
    out = tmp_path / "run"
    rc = cli(["run", "--method", "sequential", "--world", str(tiny_world.root), "--out", str(out),
              "--max_steps", "1", "--num_phases", "1", "--pdbs", "2", "--num_train_examples",
              "4", "--progress", "false"])  # fmt: skip
    assert rc == 1
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.to_dict()["unlearn"]["status"] == "failed"
    assert "| forget_heldout | forget | acc | failed (RuntimeError: scorer crashed) |" in card.text
    assert "forget_heldout" not in {e.dataset_name for e in card.data.eval_results}
    assert "forget" in {e.dataset_name for e in card.data.eval_results}


def test_a_readme_the_tool_did_not_write_is_never_replaced(lora_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(lora_run, run)
    mine = "# My notes on this model\n"
    (run / "model" / "README.md").write_text(mine)
    written = write_cards(run)
    assert written == [run / "adapter" / "README.md"]
    assert (run / "model" / "README.md").read_text() == mine
    assert "left as it is" in capsys.readouterr().err
    # A model directory the run did not save (no stamp of it) gets no card either.
    (run / "adapter" / "unlearn_run.json").unlink()
    (run / "adapter" / "README.md").unlink()
    assert write_cards(run) == [] and not (run / "adapter" / "README.md").exists()
    assert card_run(run / "model" / "README.md") is None
    assert RunDir(run).owns(run / "model")


def _facts(**changes) -> CardFacts:
    facts = CardFacts(
        run_id="r1", kind="unlearn", status="failed", base_model="EleutherAI/pythia-70m",
        revision="step3000", method="lens", config={"lr": 1e-4},
        data={"forget": "bio.jsonl", "retain": "wikitext:wikitext-103-raw-v1"},
        datasets=["wikitext"], step=10,
        results=[CardResult("forget", "acc", 0.25, 0.02, role="forget"),
                 CardResult("retain", "acc", None, error="RuntimeError: scorer crashed",
                            role="retain")],
    )  # fmt: skip
    for k, v in changes.items():
        setattr(facts, k, v)
    return facts


def test_hub_fields_failed_results_and_partial_worst_cases(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(render_card(_facts()))
    card = ModelCard.load(path)
    # A hub model is the hub's base_model; its revision is in ours and in the body.
    assert card.data.base_model == "EleutherAI/pythia-70m" and card.data.datasets == ["wikitext"]
    assert card.data.to_dict()["unlearn"]["revision"] == "step3000"
    assert "at revision `step3000`" in card.text
    # A failed evaluation is a word in the body, never a number in model-index.
    assert [(e.dataset_name, e.metric_value) for e in card.data.eval_results] == [("forget", 0.25)]
    assert "| retain | retain | acc | failed (RuntimeError: scorer crashed) | - |" in card.text
    assert card_run(path) == "r1"

    partial = {"suite": "quick", "heldout_task": "forget_heldout", "complete": False,
               "worst_case": None, "worst_case_lower_bound": 0.5, "worst_attack": "linear",
               "gap_to_filtered": None, "failed": ["ablation"], "missing_families": ["ablation"],
               "run": "/tmp/rb"}  # fmt: skip
    path.write_text(render_card(_facts(robustness=partial)))
    card = ModelCard.load(path)
    assert "- worst case: >= 50.00% (partial: a lower bound), reached by `linear`" in card.text
    assert "- failed: ablation" in card.text
    assert "worst_case_acc" not in {e.metric_type for e in card.data.eval_results}
    assert card.data.to_dict()["unlearn"]["robustness"]["complete"] is False
