"""recipes/checkpoints (`unlearn checkpoints`): the latest checkpoint whose forget accuracy is
still at chance."""

from __future__ import annotations

import json

import pytest

from unlearn.errors import UsageError
from unlearn.recipes.source_checkpoints import (
    NOTE_LEARNING,
    NOTE_RANDOM,
    NOTE_VIABLE,
    Checkpoint,
    CheckpointsConfig,
    chance_level,
    checkpoint_suite,
    default_margin,
    mark_viable,
    table,
)


def ckpt(label: str, forget: float | None, retain: float = 0.5) -> Checkpoint:
    result = {"status": "failed", "error": "boom"} if forget is None else {"acc": forget, "n": 100}
    return Checkpoint(label, "m", label, result, {"acc": retain, "n": 100})


def test_latest_viable_is_the_last_checkpoint_within_the_margin():
    cks = [ckpt("s1", 0.24), ckpt("s2", 0.27), ckpt("s3", 0.30), ckpt("s4", 0.45), ckpt("s5", 0.6)]
    assert mark_viable(cks, chance=0.25, margin=0.03) == 1  # 0.27 <= 0.28 < 0.30
    assert [c.note for c in cks] == [NOTE_RANDOM, NOTE_VIABLE, NOTE_LEARNING, "", ""]
    assert mark_viable(cks, chance=0.25, margin=0.05) == 2
    assert mark_viable([ckpt("s4", 0.45)], chance=0.25, margin=0.03) is None


def test_a_failed_evaluation_is_never_viable():
    cks = [ckpt("s1", 0.25), ckpt("s2", None)]
    assert mark_viable(cks, chance=0.25, margin=0.03) == 0
    assert cks[1].note == "eval failed"
    assert "| s2 | failed | 50.00% | eval failed |" in table(cks, "forget", "retain")


def test_a_result_that_is_not_a_finite_number_is_a_word_in_the_table():
    """The one result-cell rule: a NaN accuracy is a failed result, a missing one a dash."""
    cks = [ckpt("s1", 0.25), Checkpoint("s2", "m", "s2", {"acc": float("nan")}, {})]
    text = table(cks, "forget", "retain")
    assert "| s2 | failed | - |" in text
    assert "nan" not in text.lower()


def test_default_margin_is_two_standard_errors_atchance_level():
    # 2 * sqrt(0.25 * 0.75 / 48) = 0.125 exactly; large n is floored at one point.
    assert default_margin(0.25, 48) == pytest.approx(0.125)
    assert default_margin(0.25, 10**7) == 0.01


def test_config_validation():
    with pytest.raises(UsageError, match="needs --model"):
        CheckpointsConfig(revisions=["a"])
    with pytest.raises(UsageError, match="--backend must be one of"):
        CheckpointsConfig(paths=["x"], backend="fast")
    cfg = CheckpointsConfig(model="org/m", revisions=["global_step1,global_step2", "global_step3"])
    assert cfg.revisions == ["global_step1", "global_step2", "global_step3"]
    assert (cfg.backend, cfg.forget_task, cfg.retain_task) == ("auto", "wmdp_bio_robust", "mmlu")


def test_chance_comes_from_the_world_questions_with_either_backend(tmp_path):
    """Three-choice forget questions: chance is 1/3 whichever backend scores them (lm-eval on a
    world task used to assume four choices); a benchmark keeps --chance's default."""
    from types import SimpleNamespace

    rows = [{"prompt": "P", "choices": [" a", " b", " c"], "answer": i % 3} for i in range(6)]
    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps(r) + "\n" for r in rows))
    world = SimpleNamespace(questions={"forget": forget, "retain": forget})
    for backend in ("native", "lm-eval"):
        cfg = CheckpointsConfig(world="w", backend=backend, forget_task="forget")
        assert chance_level(cfg, checkpoint_suite(cfg, world)) == pytest.approx(1 / 3), backend
    cfg = CheckpointsConfig(world="w", forget_task="wmdp_bio_robust")
    assert chance_level(cfg, checkpoint_suite(cfg, world)) == 0.25  # a benchmark


def test_checkpoints_on_the_tiny_world_pick_the_ignorant_checkpoint(tiny_world, tmp_path, capsys):
    """Phase 1 of the world's pretraining never shows a forget document; its last checkpoint is
    the latest one at chance on the forget questions."""
    from unlearn.cli import main
    from unlearn.runs.store import Store

    out, store = tmp_path / "ck", tmp_path / "s.sqlite"
    argv = ["checkpoints", "--world", str(tiny_world.root), "--out", str(out)]
    assert main([*argv, "--store", str(store)]) == 0
    expected = tiny_world.ignorant_checkpoint.name
    result = json.loads((out / "checkpoints.json").read_text())
    assert result["latest_viable"] == expected
    assert [c["label"] for c in result["checkpoints"]] == [p.name for p in tiny_world.checkpoints]
    printed = capsys.readouterr().out
    assert f"latest viable source checkpoint: {expected}" in printed
    assert "| Checkpoint | forget | retain | Notes |" in (out / "checkpoints.md").read_text()
    with Store(store) as s:
        run = s.run(f"ckpt-{expected}")
        assert run is not None and run.status == "done"
        assert run.config["note"] == NOTE_VIABLE
        assert set(s.final_evals(run.id)) == {"forget", "retain"}
