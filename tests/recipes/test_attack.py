"""Tamper attack: a curve with step 0, on the tiny world."""

from __future__ import annotations

import json

from unlearn.cli import main as cli
from unlearn.fsutil import read_jsonl


def test_attack_curve_starts_at_step_0(tiny_world, tmp_path):
    out = tmp_path / "attack"
    rc = cli(["attack", "--model", str(tiny_world.filtered), "--world", str(tiny_world.root),
              "--out", str(out), "--max_steps", "4", "--eval_every", "2", "--pdbs", "4",
              "--progress", "false", "--parent", "baseline-filtered"])  # fmt: skip
    assert rc == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["kind"] == "attack" and meta["status"] == "done"
    assert meta["parent"] == "baseline-filtered"
    acc = [r for r in read_jsonl(out / "evals.jsonl") if r["metric"] == "acc"]
    assert {(r["step"], r["task"]) for r in acc} == {
        (s, t) for s in (0, 2, 4) for t in tiny_world.questions
    }
    assert all(r["status"] == "done" and 0 <= r["value"] <= 1 for r in acc)
    # The filtered twin never saw the forget domain: step 0 is near chance on held-out facts.
    step0 = {r["task"]: r["value"] for r in acc if r["step"] == 0}
    assert step0["forget_heldout"] < 0.5 < step0["retain"]
    losses = [r for r in read_jsonl(out / "metrics.jsonl") if r["name"] == "lm"]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]


def test_attack_teaches_the_attack_group_to_a_model_that_knows_it_less(tiny_world, tmp_path):
    """The attack trains in the right direction: the first checkpoint after the ignorant one
    half-knows the forget domain (less than the target); a few attack steps on the attack
    group's documents raise its accuracy on that group's questions."""
    checkpoints = tiny_world.checkpoints
    model = checkpoints[checkpoints.index(tiny_world.ignorant_checkpoint) + 1]
    out = tmp_path / "attack"
    # 30 steps: on the format-2 tiny world the first few steps at a fresh optimizer's lr 1e-3
    # move this checkpoint's accuracy by a question either way (measured: +0.15 after 30).
    rc = cli(["attack", "--model", str(model), "--world", str(tiny_world.root), "--out", str(out),
              "--max_steps", "30", "--eval_every", "30", "--pdbs", "8",
              "--forget_tasks", "forget_attack", "--progress", "false"])  # fmt: skip
    assert rc == 0
    rows = read_jsonl(out / "evals.jsonl")
    acc = {r["step"]: r["value"] for r in rows if r["metric"] == "acc"}
    prob = {r["step"]: r["value"] for r in rows if r["metric"] == "correct_prob"}
    target = tiny_world.stats["baseline"]["target"]["forget_attack"]["acc"]
    assert acc[0] < target - 0.2  # it knows the attack group less than the target does
    assert acc[30] > acc[0] + 0.08, acc
    assert prob[30] > prob[0], prob


def test_attack_bad_input(tiny_world, tmp_path, capsys):
    assert cli(["attack", "--world", str(tiny_world.root), "--out", str(tmp_path / "a")]) == 2
    rc = cli(["attack", "--model", str(tiny_world.target), "--world", str(tiny_world.root),
              "--out", str(tmp_path / "a"), "--forget_tasks", "nope"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--model is required" in err[0] and "unknown task" in err[1]
    assert not (tmp_path / "a").exists()


def test_attack_without_a_world_draws_its_curve_on_a_question_file(tiny_hf_models, tmp_path):
    """A hub-shaped attack: --model, --corpus and a suite of local benchmark-format files."""
    rows = [{"question": f"Where does strain {i} spread?", "choices": ["air", "water", "soil"],
             "answer": i % 3} for i in range(6)]  # fmt: skip
    bio = tmp_path / "bio.jsonl"
    bio.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = tmp_path / "attack.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Strain {i} spreads by air."}) + "\n"
                              for i in range(8)))  # fmt: skip
    out = tmp_path / "attack"
    base = ["attack", "--model", str(tiny_hf_models["llama"]), "--out", str(out)]
    assert cli([*base, "--forget_tasks", str(bio)]) == 2  # no world and no --corpus
    assert not out.exists()
    rc = cli([*base, "--corpus", str(corpus), "--forget_tasks", f"{bio}@4",
              "--max_steps", "2", "--eval_every", "1", "--pdbs", "4", "--max_length", "16",
              "--progress", "false"])  # fmt: skip
    assert rc == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] in ("done", "collapsed") and meta["config"]["suite"]["forget"] == ["bio"]
    acc = [r for r in read_jsonl(out / "evals.jsonl") if r["metric"] == "acc"]
    assert [(r["step"], r["task"]) for r in acc] == [(0, "bio"), (1, "bio"), (2, "bio")]
    assert all(r["status"] == "done" and r["value"] in (0, 0.25, 0.5, 0.75, 1) for r in acc)


def test_attacks_on_one_model_share_its_step_0_evaluation(tiny_world, tmp_path, monkeypatch):
    from unlearn.eval.suite import PreparedSuite
    from unlearn.recipes.attack import StartScores, build_attack_config, run_attack

    scored = []
    score = PreparedSuite.score

    def counted(self, model, tokenizer, key, *args, **kwargs):
        scored.append(key)
        return score(self, model, tokenizer, key, *args, **kwargs)

    monkeypatch.setattr(PreparedSuite, "score", counted)

    def attack(name: str, start: StartScores | None, **overrides) -> dict:
        cfg = build_attack_config({"model": str(tiny_world.filtered), "world": str(tiny_world.root),
                                   "out": str(tmp_path / name), "max_steps": 2, "eval_every": 2,
                                   "pdbs": 4, "progress": False, **overrides})  # fmt: skip
        scored.clear()
        assert run_attack(cfg, start).status == "done"
        rows = read_jsonl(tmp_path / name / "evals.jsonl")
        return {"scored": len(scored), "step0": [r for r in rows if r["step"] == 0]}

    alone = attack("lora-alone", None, lora=True)  # LoRA starts at zero: the model as loaded
    tasks = alone["scored"] // 2  # steps 0 and 2
    start = StartScores()
    first = attack("full", start)
    second = attack("lora", start, lora=True, lr=1e-2)
    other_dtype = attack("bf16", start, dtype="bfloat16")
    assert first["scored"] == 2 * tasks > 0
    assert second["scored"] == tasks  # step 2 only: step 0 came from the first attack
    assert alone["step0"] == first["step0"] == second["step0"]
    assert other_dtype["scored"] == 2 * tasks  # other weights at step 0: scored again
