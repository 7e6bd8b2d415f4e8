"""The unlearning recipe's run-level outcomes of evaluation (through runs.lifecycle):
an evaluation that raises is a failed row and a failed run (never a number), a collapsed result
marks the run collapsed; both reach run.json and the results store."""

from __future__ import annotations

import unlearn.eval.suite as suite
from unlearn.recipes.unlearning import build_run_config, run_unlearning
from unlearn.runs.rundir import RunDir
from unlearn.runs.store import Store

BROKEN = "forget_heldout"


def _run(tiny_world, tmp_path):
    """One optimizer step of sequential LoRA unlearning, evaluated, indexed in a store."""
    cfg = build_run_config(
        "sequential",
        {"world": str(tiny_world.root), "out": str(tmp_path / "run"), "max_steps": 1,
         "num_phases": 1, "pdbs": 2, "grad_accum": 1, "num_train_examples": 4,
         "store": str(tmp_path / "store.db"), "progress": False},
    )  # fmt: skip
    meta = run_unlearning(cfg)
    with Store(tmp_path / "store.db") as store:
        stored = store.run(meta.id)
        evals = store.evals(meta.id)
    return meta, RunDir(tmp_path / "run").read(), stored, evals


def _patched(monkeypatch, change) -> None:
    """Evaluate for real, then let `change(task, result)` break or alter one task's result."""
    real = suite.evaluate_questions

    def evaluate_questions(model, tokenizer, questions, batch_size, progress, task, *args):
        result = real(model, tokenizer, questions, batch_size, progress, task, *args)
        change(task, result)
        return result

    monkeypatch.setattr(suite, "evaluate_questions", evaluate_questions)


def test_an_evaluation_that_raises_is_a_failed_row_and_a_failed_run(
    tiny_world, tmp_path, monkeypatch
):
    def change(task, result):
        if task == BROKEN:
            raise RuntimeError("scorer crashed")
        if task == "retain":  # evaluated after the failure: a collapse must not hide it
            result["collapse"] = {**result["collapse"], "collapsed": True}

    _patched(monkeypatch, change)
    meta, record, stored, evals = _run(tiny_world, tmp_path)
    assert meta.status == record.meta.status == stored.status == "failed"
    failed = [e for e in record.evals if e.task == BROKEN]
    assert len(failed) == 1 and failed[0].status == "failed" and failed[0].value is None
    assert failed[0].error == "RuntimeError: scorer crashed"
    # The other tasks were still evaluated and recorded as numbers.
    others = {e.task for e in record.evals if e.metric == "acc" and e.value is not None}
    assert others == set(tiny_world.questions) - {BROKEN}
    assert [(e.status, e.value) for e in evals if e.task == BROKEN] == [("failed", None)]


def test_a_collapsed_result_marks_the_run_collapsed(tiny_world, tmp_path, monkeypatch):
    def change(task, result):
        if task == "retain":
            result["collapse"] = {**result["collapse"], "collapsed": True}

    _patched(monkeypatch, change)
    meta, record, stored, evals = _run(tiny_world, tmp_path)
    assert meta.status == record.meta.status == stored.status == "collapsed"
    # Its error says which task collapsed and how, for the report's notes.
    assert meta.error == stored.error and meta.error.startswith("collapsed: retain: ")
    assert "of answers" in meta.error
    # A collapsed result is still recorded: its numbers are what the report flags.
    acc = {e.task: e.value for e in record.evals if e.metric == "acc"}
    assert set(acc) == set(tiny_world.questions) and all(v is not None for v in acc.values())
    assert {e.status for e in evals} == {"done"}


def test_an_unaltered_evaluation_leaves_the_run_done(tiny_world, tmp_path, monkeypatch):
    """The control: the same run with the real evaluator is done (the tiny target does not
    collapse), so the two statuses above come from the patched results alone."""
    _patched(monkeypatch, lambda task, result: None)
    meta, record, stored, _ = _run(tiny_world, tmp_path)
    assert meta.status == record.meta.status == stored.status == "done"
