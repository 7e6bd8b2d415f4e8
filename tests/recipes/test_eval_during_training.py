"""Evaluation during training (--eval_every of run and distill) and --save_best: the curve in
evals.jsonl and the report's plot, the best step's model kept by the boundary rule (checked
against evals.jsonl), kept across a preemption, and bad values refused before weights load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unlearn.cli import main as cli
from unlearn.eval.suite import PreparedSuite
from unlearn.fsutil import read_jsonl
from unlearn.report.curves import TRAINING_PNG, training_curves
from unlearn.report.data import ReportData
from unlearn.report.render import render_report
from unlearn.runs.lifecycle import ActiveRun
from unlearn.runs.rundir import RunDir
from unlearn.runs.store import Store
from unlearn.training.preemption import EXIT_PREEMPTED

FAST = ["--method", "sequential", "--num_phases", "1", "--pdbs", "2", "--grad_accum", "1",
        "--num_train_examples", "4", "--progress", "false", "--eval_limit", "20"]  # fmt: skip
"""A few-step full fine-tuning run (sequential's default: no LoRA) on cheap evaluations."""
FORGET, RETAIN = ("forget", "forget_heldout"), ("retain", "retain_late", "near_domain")
"""The roles of the world suite's accuracy tasks."""


def run_argv(world, out: Path, *extra: str) -> list[str]:
    return ["run", "--world", str(world.root), "--out", str(out), *FAST, *extra]


def distill_argv(world, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(world.target), "--world", str(world.root), "--out",
            str(out), "--num_train_examples", "16", "--pdbs", "4", "--progress", "false",
            "--eval_limit", "20", *extra]  # fmt: skip


def steps_of(out: Path) -> dict[str, list[int]]:
    """{task: the steps of its accuracy rows, in file order}."""
    steps: dict[str, list[int]] = {}
    for row in read_jsonl(out / "evals.jsonl"):
        if row["metric"] == "acc":
            steps.setdefault(row["task"], []).append(row["step"])
    return steps


def rule_best(out: Path, delta: float = 0.02) -> int | None:
    """The boundary rule over evals.jsonl, written out independently: among the steps after 0
    whose every retain task is within delta of its step-0 accuracy, the lowest forget accuracy
    (ties: the higher retain minimum, then the earlier step)."""
    acc = {(r["step"], r["task"]): r["value"] for r in read_jsonl(out / "evals.jsonl")
           if r["metric"] == "acc" and r["status"] == "done"}  # fmt: skip
    ok = [
        s
        for s in sorted({s for s, _ in acc} - {0})
        if (s, "forget") in acc
        and all((s, t) in acc and acc[s, t] >= acc[0, t] - delta - 1e-9 for t in RETAIN)
    ]
    key = lambda s: (acc[s, "forget"], -min(acc[s, t] for t in RETAIN), s)  # noqa: E731
    return min(ok, key=key) if ok else None


def test_run_records_its_curve_and_the_report_plots_it(tiny_world, tmp_path, capsys):
    out, store = tmp_path / "run", tmp_path / "store.db"
    argv = run_argv(tiny_world, out, "--max_steps", "5", "--eval_every", "2", "--save_best",
                    "--store", str(store))  # fmt: skip
    assert cli(argv) == 0
    # Step 0 and every 2 steps before the last during training, then the final evaluation.
    steps = steps_of(out)
    assert set(steps) == set(tiny_world.questions)
    assert all(s == [0, 2, 4, 5] for s in steps.values()), steps
    meta = RunDir(out).read_meta()
    assert meta.status == "done" and meta.config["eval_every"] == 2
    # --save_best on real scores: the step the rule picks from evals.jsonl, or none at all.
    chosen = rule_best(out)
    printed = capsys.readouterr().out
    if chosen is None:
        assert meta.best is None and not (out / "best").exists()
        assert "best step: none" in printed
    else:
        assert meta.best["step"] == chosen and (out / "best" / "model").is_dir()
        assert f"best step: {chosen} " in printed
    # The final evaluation is what the command prints: one line per task.
    assert printed.count("  forget ") == 1

    with Store(store) as s:
        md = render_report(s, tmp_path / "report").read_text()
        curves = training_curves(ReportData.load(s), s)
    assert f"![training curves]({TRAINING_PNG})" in md
    assert (tmp_path / "report" / TRAINING_PNG).stat().st_size > 0
    [(label, forget, retain)] = curves
    assert label.startswith(meta.id) and [s for s, _ in forget] == [0, 2, 4, 5]
    assert [s for s, _ in retain] == [0, 2, 4, 5]


def test_distill_records_its_curve(tiny_world, tmp_path):
    out, store = tmp_path / "undo", tmp_path / "store.db"
    argv = distill_argv(tiny_world, out, "--max_steps", "4", "--eval_every", "2",
                        "--store", str(store))  # fmt: skip
    assert cli(argv) == 0
    steps = steps_of(out)
    assert set(steps) == set(tiny_world.questions)
    assert all(s == [0, 2, 4] for s in steps.values()), steps
    with Store(store) as s:
        [(label, forget, _)] = training_curves(ReportData.load(s), s)
    assert "(distill)" in label and [s for s, _ in forget] == [0, 2, 4]


SCRIPT = {0: (0.8, 0.9), 2: (0.5, 0.9), 4: (0.2, 0.5), 6: (0.6, 0.9), 8: (0.45, 0.9)}
"""(forget, retain) accuracy by step: step 4 has the lowest forget but breaks the retain rule,
step 6 keeps it but forgets less than step 2, step 8 beats step 2."""


@pytest.fixture
def scripted(monkeypatch):
    """Scores from SCRIPT by the evaluated step (the other tasks for real); records the live
    model's weights at each step, and which step OUT/best held when each evaluation began."""
    seen: dict = {"step": None, "weights": {}, "held": {}}
    evaluate, score = ActiveRun.evaluate, PreparedSuite.score

    def evaluating(self, step, tasks, scorer, metric=None, final=True):
        seen["step"] = step
        held = self.out / "best" / "best.json"
        seen["held"][step] = json.loads(held.read_text())["step"] if held.exists() else None
        return evaluate(self, step, tasks, scorer, metric, final)

    def scoring(self, model, tokenizer, key, batch_size=64, progress=False):
        step = seen["step"]
        if key == "forget":
            seen["weights"][step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if key in FORGET or key in RETAIN:
            return {"acc": SCRIPT[step][0 if key in FORGET else 1], "n": 20}
        return score(self, model, tokenizer, key, batch_size, progress)

    monkeypatch.setattr(ActiveRun, "evaluate", evaluating)
    monkeypatch.setattr(PreparedSuite, "score", scoring)
    return seen


def assert_model_of_step(out: Path, weights: dict[str, torch.Tensor]) -> None:
    saved = load_file(out / "best" / "model" / "model.safetensors")
    shared = set(saved) & set(weights)
    assert len(shared) > 4
    for name in shared:
        assert torch.equal(saved[name], weights[name]), name


def test_save_best_keeps_the_model_of_the_best_step_by_the_rule(tiny_world, tmp_path, scripted):
    out = tmp_path / "run"
    assert cli(run_argv(tiny_world, out, "--max_steps", "6", "--eval_every", "2",
                        "--save_best")) == 0  # fmt: skip
    best = RunDir(out).read_meta().best
    assert best["step"] == rule_best(out) == 2
    assert best["forget"] == 0.5 and best["retains"] == dict.fromkeys(RETAIN, 0.9)
    assert json.loads((out / "best" / "best.json").read_text()) == best
    assert best["model"] == str(out / "best" / "model")
    assert_model_of_step(out, scripted["weights"][2])
    # Not the final model: training went on after step 2.
    final, at_2 = load_file(out / "model" / "model.safetensors"), scripted["weights"][2]
    assert any(not torch.equal(final[k], at_2[k]) for k in set(final) & set(at_2))
    # A later fresh run in the same directory starts without the old best.
    assert cli(run_argv(tiny_world, out, "--max_steps", "2", "--eval_every", "2")) == 0
    assert not (out / "best").exists() and RunDir(out).read_meta().best is None


def test_a_resumed_run_keeps_its_best(tiny_world, tmp_path, scripted, monkeypatch):
    out = tmp_path / "run"
    argv = run_argv(tiny_world, out, "--max_steps", "8", "--eval_every", "2", "--save_best")
    log = RunDir.append_metrics

    def preempt_at_step_3(self, step, values):
        log(self, step, values)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler

    monkeypatch.setattr(RunDir, "append_metrics", preempt_at_step_3)
    assert cli(argv) == EXIT_PREEMPTED
    assert RunDir(out).read_meta().best["step"] == 2
    assert_model_of_step(out, scripted["weights"][2])

    assert cli(argv) == 0  # resumes from step 3 (step 3 is not logged again)
    # After the resume, step 6 (worse than step 2) did not replace the best: the resumed run
    # compared it with step 2 and with the step-0 reference kept in evals.jsonl.
    assert scripted["held"][6] == 2 and scripted["held"][8] == 2
    best = RunDir(out).read_meta().best
    assert best["step"] == rule_best(out) == 8
    assert steps_of(out)["forget"] == [0, 2, 4, 6, 8]
    assert_model_of_step(out, scripted["weights"][8])


def test_save_best_under_torchrun(tiny_world, tmp_path):
    """Two processes with FSDP2 (the evaluation sharded, each save gathering the shards) and
    LoRA merged: every rank takes the same decisions, or a save would hang or fail."""
    out = tmp_path / "two"
    argv = run_argv(tiny_world, out, "--max_steps", "4", "--eval_every", "2", "--save_best",
                    "--delta", "0.9", "--lora", "true", "--distributed", "fsdp2")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "unlearn", *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = RunDir(out).read_meta()
    assert meta.status == "done" and steps_of(out)["forget"] == [0, 2, 4]
    # A margin of 0.9 lets every trained step count: a best is chosen, and saved.
    assert meta.best["step"] == rule_best(out, delta=0.9)
    assert (out / "best" / "adapter").is_dir() and (out / "best" / "model").is_dir()
    assert done.stdout.count("best step: ") == 1  # rank 0 says it, once


@pytest.mark.parametrize(
    ("command", "extra", "needle"),
    [
        ("run", ["--eval_every", "0"], "--eval_every must be >= 1, got 0"),
        ("run", ["--eval_every", "6"], "--eval_every 6 is larger than the run (5 optimizer"),
        ("run", ["--save_best"], "--save_best needs --eval_every"),
        ("run", ["--eval_every", "2", "--eval", "false"], "--eval_every needs the evaluation"),
        ("run", ["--eval_every", "2", "--save_best", "--delta", "1"], "--delta must be in"),
        (
            "run",
            ["--eval_every", "2", "--save_best", "--forget_tasks", "forget"],
            "--save_best needs a retain task",
        ),
        ("distill", ["--eval_every", "0"], "--eval_every must be >= 1, got 0"),
        ("distill", ["--eval_every", "9"], "--eval_every 9 is larger than the run (5 optimizer"),
        ("distill", ["--save_best", "true"], "--save_best needs --eval_every"),
    ],
)
def test_bad_values_exit_2_before_weights_load(
    tiny_world, tmp_path, monkeypatch, capsys, command, extra, needle
):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    out = tmp_path / "out"
    build = run_argv if command == "run" else distill_argv
    assert cli(build(tiny_world, out, "--max_steps", "5", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()
