"""TensorBoard: `unlearn run` and `unlearn attack` with --report_to tensorboard, read back with
tensorboard's own reader: every logged value by step, each evaluation at its step, the final
results and config; a resumed or restarted run's curve holds each step once."""

from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest

from unlearn.cli import main as cli
from unlearn.runs.rundir import RunDir
from unlearn.training.preemption import EXIT_PREEMPTED

from .helpers import attack_argv, run_argv, scalars, texts, tracking_free


def steps(points: list[tuple[int, float]]) -> list[int]:
    return [s for s, _ in points]


def test_run_reports_loss_terms_throughput_evaluations_and_config(tiny_world, tmp_path):
    out = tmp_path / "run"
    argv = run_argv(tiny_world, out, "--report_to", "tensorboard", "--tags", "tiny", "seq")
    assert cli(argv) == 0
    record = RunDir(out).read()
    logged = scalars(out / "tensorboard")

    # Every value of metrics.jsonl (loss terms, coefficients, lr, grad norm) at its step.
    rows: dict[str, list[tuple[int, float]]] = {}
    for m in record.metrics:
        rows.setdefault(f"train/{m.name}", []).append((m.step, m.value))
    assert {"train/forget", "train/retain", "train/loss", "train/lr", "train/grad_norm"} <= set(
        rows
    )
    for name, points in rows.items():
        assert steps(logged[name]) == steps(points) == [1, 2], name
        assert [v for _, v in logged[name]] == pytest.approx([v for _, v in points], rel=1e-6)
    # Throughput at each logged step; wall-clock, so kept out of metrics.jsonl (reproducible).
    assert steps(logged["train/tokens_per_s"]) == [1, 2]
    assert all(v > 0 for _, v in logged["train/tokens_per_s"])
    assert "tokens_per_s" not in {m.name for m in record.metrics}

    # Each evaluation at its step, and the final results and loss terms.
    evals = [e for e in record.evals if e.value is not None]
    assert {e.task for e in evals} >= {"forget", "retain"}
    for e in evals:
        assert logged[f"eval/{e.task}/{e.metric}"] == [(2, pytest.approx(e.value, rel=1e-6))]
        assert logged[f"final/eval/{e.task}/{e.metric}"] == [(2, pytest.approx(e.value, rel=1e-6))]
    assert not any(name.endswith("_stderr") for name in logged)  # in evals.jsonl, not plotted
    for term, value in record.meta.final.items():
        assert logged[f"final/train/{term}"] == [(2, pytest.approx(value, rel=1e-6))]

    text = texts(out / "tensorboard")
    config = json.loads(textwrap.dedent(text["config"]))
    assert config["method"] == "sequential" and config["kind"] == "unlearn"
    assert config["max_steps"] == 2 and config["tags"] == ["tiny", "seq"]
    assert text["status"] == "done"
    assert tracking_free(record.meta.config)  # operational: never part of the run's config


def test_attack_curve_by_step_in_a_project_folder(tiny_world, tmp_path):
    out, board = tmp_path / "attack", tmp_path / "board"
    flags = ["--report_to", "tensorboard", "--tracking_dir", str(board), "--project", "p",
             "--group", "g", "--run_name", "a1"]  # fmt: skip
    assert cli(attack_argv(tiny_world, out, *flags)) == 0
    assert not (out / "tensorboard").exists()  # --tracking_dir: DIR/PROJECT/GROUP/RUN_NAME
    logged = scalars(board / "p" / "g" / "a1")
    assert steps(logged["train/lm"]) == [1, 2, 3, 4]
    curve = {(e.step, e.task): e.value for e in RunDir(out).read().evals if e.metric == "acc"}
    for task in ("forget", "forget_heldout", "retain"):
        got = logged[f"eval/{task}/acc"]
        assert steps(got) == [0, 2, 4]  # the curve, step 0 included
        assert [v for _, v in got] == pytest.approx([curve[s, task] for s in (0, 2, 4)])
    assert "final/eval/forget_heldout/acc" in logged and "final/train/lm" in logged


def test_resumed_run_continues_its_curve_whatever_its_tracking_flags(
    tiny_world, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    log = RunDir.append_metrics

    def preempt_at_step_1(self, step, values):
        log(self, step, values)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler: checkpoint

    monkeypatch.setattr(RunDir, "append_metrics", preempt_at_step_1)
    assert cli(run_argv(tiny_world, out, "--report_to", "tensorboard", steps=3)) == EXIT_PREEMPTED
    started = RunDir(out).read_meta().started
    monkeypatch.setattr(RunDir, "append_metrics", log)

    # Other tracking settings: still the same run (they are not part of its config).
    again = run_argv(tiny_world, out, "--report_to", "tensorboard", "--tags", "resumed", steps=3)
    assert cli(again) == 0
    meta = RunDir(out).read_meta()
    assert meta.status == "done" and meta.started == started  # resumed, not restarted
    logged = scalars(out / "tensorboard")
    assert steps(logged["train/forget"]) == [1, 2, 3]  # each step once, across both attempts
    assert steps(logged["eval/forget/acc"]) == [3]


def test_a_fresh_run_in_the_same_directory_hides_the_earlier_curve(tiny_world, tmp_path):
    out = tmp_path / "run"
    assert cli(run_argv(tiny_world, out, "--report_to", "tensorboard", steps=3)) == 0
    first = scalars(out / "tensorboard")
    assert cli(run_argv(tiny_world, out, "--report_to", "tensorboard", "--lr", "1e-4")) == 0
    logged = scalars(out / "tensorboard")
    # TensorBoard's purge: the earlier run's steps are gone, the new run's are there once.
    assert steps(logged["train/forget"]) == [1, 2]
    assert steps(logged["final/eval/forget/acc"]) == [2]
    assert logged["train/lr"] != first["train/lr"][:2]
