"""recipes/evaluate (`unlearn eval`): validation before weights, one model or the baselines."""

from __future__ import annotations

import json

import pytest

from unlearn.config.settings import ModelArgs
from unlearn.errors import UsageError
from unlearn.models.load import load_model, load_tokenizer
from unlearn.models.refs import resolve_model
from unlearn.recipes.evaluation import EvalConfig, evaluate
from unlearn.world import evaluate_world


def test_evaluate_one_model_writes_what_the_world_evaluator_gives(tiny_world, tmp_path):
    target = tiny_world.target.relative_to(tiny_world.root)  # world-relative, as world.json has it
    cfg = EvalConfig(
        world=str(tiny_world.root),
        model_args=ModelArgs(str(target)),
        tasks=["forget"],
        limit=4,
        output=str(tmp_path / "r.json"),
    )
    evaluation = evaluate(cfg)
    assert evaluation.tasks == ["forget"] and list(evaluation.outputs) == [target.name]
    out = evaluation.outputs[target.name]
    ref = resolve_model(tiny_world.target)
    direct = evaluate_world(load_model(ref), load_tokenizer(ref), tiny_world, ["forget"], limit=4)
    assert out["results"]["forget"]["acc"] == direct["forget"]["acc"]
    assert out["results"]["forget"]["n"] == 4 and out["backend"] == "auto"
    assert out["results"]["forget"]["backend"] == "native"  # a world task: scored natively
    assert evaluation.output == tmp_path / "r.json"
    assert json.loads(evaluation.output.read_text())["results"]["forget"]["n"] == 4
    assert evaluation.failed == [] and evaluation.collapsed == []


def test_bad_input_is_refused_before_anything_loads(tiny_world, tmp_path):
    world = str(tiny_world.root)
    with pytest.raises(UsageError, match="unknown task"):
        evaluate(EvalConfig(world=world, model_args=ModelArgs("x"), tasks=["nope"]))
    with pytest.raises(UsageError, match="is a directory"):
        evaluate(EvalConfig(world=world, model_args=ModelArgs("x"), output=str(tmp_path)))
    with pytest.raises(UsageError, match="not found"):
        evaluate(EvalConfig(world=world, model_args=ModelArgs(str(tmp_path / "no_model"))))
    with pytest.raises(UsageError, match="drop --model"):
        EvalConfig(world=world, model_args=ModelArgs("x"), baselines=True)


def test_ppl_tasks_are_native_with_the_lm_eval_child_process(tiny_world, tmp_path, monkeypatch):
    """`--backend lm-eval --timeout`: lm-eval's child gets the question tasks only; a perplexity
    task (lm-eval has none of a file) is scored here, natively, and results keep suite order."""
    docs = tmp_path / "docs.txt"
    docs.write_text("The river flows north.\n\nBakers rise early.\n")
    sent = []

    def fake_saved(model, names, *args, **kwargs):
        sent.extend(names)
        return {name: {"acc": 0.5, "n": 4} for name in names}

    monkeypatch.setattr("unlearn.recipes.evaluation.run_saved", fake_saved)
    cfg = EvalConfig(
        world=str(tiny_world.root),
        model_args=ModelArgs(str(tiny_world.target)),
        tasks=[f"ppl:{docs}", "forget"],
        backend="lm-eval",
        timeout=60,
    )
    results = evaluate(cfg).outputs[tiny_world.target.name]["results"]
    assert sent == ["forget"] and list(results) == ["docs", "forget"]
    assert results["docs"]["n"] == 2 and results["docs"]["ppl"] > 1
    assert results["docs"]["backend"] == "native"
