"""Running sweeps: the local executor, resume after a kill, failures, the sweep lock, signals."""

from __future__ import annotations

import os
import signal

import pytest

from unlearn import cli
from unlearn.errors import UsageError
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RunDir, latest_checkpoint
from unlearn.runs.store import Store
from unlearn.sweep import execute
from unlearn.sweep.execute import run_sweep
from unlearn.sweep.spec import load_sweep
from unlearn.sweep.state import inspect_point
from unlearn.training.preemption import EXIT_PREEMPTED
from unlearn.training.tensor_files import read_info

from .helpers import base_spec, fake_run, write_spec


def test_two_point_sweep_runs_evaluates_attacks_and_indexes(tiny_world, tmp_path, monkeypatch):
    attack = {"max_steps": 2, "eval_every": 2, "pdbs": 2, "progress": False}
    spec = write_spec(tmp_path, base_spec(tiny_world, attack=attack))
    sweep = load_sweep(spec)
    states = run_sweep(sweep, log=lambda _: None)
    assert [s.status for s in states] == ["done", "done"]
    assert [s.attack for s in states] == ["done", "done"]
    assert all(isinstance(s.forget, float) and isinstance(s.retain, float) for s in states)
    with Store(sweep.store) as store:
        for p in sweep.points:
            assert store.run(p.id).status == "done"
            assert {"forget", "retain"} <= set(store.final_evals(p.id))
            attack_run = store.run(f"{p.id}-attack")
            assert attack_run.parent == p.id and attack_run.status == "done"
            assert sorted({r.step for r in store.evals(attack_run.id)}) == [0, 2]

    # Nothing left to do; an edited attack block re-runs only the attacks.
    calls = []
    real_attack = execute.run_attack
    monkeypatch.setattr(
        execute, "run_unlearning", lambda cfg, monitor=None: calls.append(cfg.args.run_id)
    )
    monkeypatch.setattr(execute, "run_attack", lambda cfg: calls.append(cfg) or real_attack(cfg))
    run_sweep(load_sweep(spec), log=lambda _: None)
    assert calls == []
    write_spec(tmp_path, base_spec(tiny_world, attack={**attack, "eval_every": 1}))
    stale = load_sweep(spec)
    assert {inspect_point(p).attack for p in stale.points} == {"stale"}
    states = run_sweep(stale, log=lambda _: None)
    assert len(calls) == 2 and [s.attack for s in states] == ["done", "done"]
    with Store(sweep.store) as store:
        curve = store.curve(f"{sweep.points[0].id}-attack", "forget")
        assert [r.step for r in curve] == [0, 1, 2]


def test_resume_after_a_kill_runs_only_the_rest(tiny_world, tmp_path, monkeypatch):
    spec = write_spec(tmp_path, base_spec(tiny_world, grid={"retain_coef": [1, 5, 20]}))
    sweep = load_sweep(spec)
    first, second, third = sweep.points
    calls: list[str] = []
    monkeypatch.setattr(execute, "run_unlearning", fake_run(calls, interrupt=(5.0,)))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, log=lambda _: None)
    assert calls == [first.id, second.id]
    assert RunDir(second.run_dir).read_meta().status == "running"
    assert [inspect_point(p).status for p in sweep.points] == ["done", "running", "pending"]

    calls.clear()
    lines: list[str] = []
    monkeypatch.setattr(execute, "run_unlearning", fake_run(calls))
    states = run_sweep(load_sweep(spec), log=lines.append)
    assert calls == [second.id, third.id]
    assert any("interrupted" in line for line in lines)
    assert f"[2/3] {second.id}: starting retain_coef=5.0" in lines
    assert any(line.startswith(f"[1/3] {first.id}: done") for line in lines)
    assert [s.status for s in states] == ["done"] * 3
    assert states[2].retain == pytest.approx(0.7)
    with Store(sweep.store) as store:
        assert {r.id for r in store.runs(status="done")} == {p.id for p in sweep.points}


def test_marks_leftover_running_dir_failed_interrupted(tiny_world, tmp_path, monkeypatch):
    sweep = load_sweep(write_spec(tmp_path, base_spec(tiny_world)))
    p = sweep.points[0]
    RunDir(p.run_dir).write_run(RunMeta(p.id, "unlearn", "sequential", status="running"))
    seen = {}

    def run(cfg, monitor=None):  # what the store and run dir say when the retry starts
        if cfg.args.run_id == p.id:
            with Store(sweep.store) as store:
                seen["store"] = (store.run(p.id).status, store.run(p.id).error)
            seen["dir_cleared"] = not p.run_dir.exists()
        return fake_run([])(cfg)

    monkeypatch.setattr(execute, "run_unlearning", run)
    run_sweep(sweep, log=lambda _: None)
    assert seen == {"store": ("failed", "interrupted"), "dir_cleared": True}


def test_a_failing_point_does_not_stop_the_next(tiny_world, tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path, base_spec(tiny_world))
    sweep = load_sweep(spec)
    calls: list[str] = []
    monkeypatch.setattr(execute, "run_unlearning", fake_run(calls, fail=(1.0,)))
    states = run_sweep(sweep, log=lambda _: None)
    assert calls == [p.id for p in sweep.points]
    assert [s.status for s in states] == ["failed", "done"]
    assert "boom" in states[0].error and "RuntimeError: boom" in capsys.readouterr().err
    with Store(sweep.store) as store:
        assert store.run(sweep.points[0].id).status == "failed"

    # A run that raises before writing run.json is still recorded; retries touch failed only.
    calls.clear()

    def broken(cfg, monitor=None):
        calls.append(cfg.args.run_id)
        raise UsageError("lens file missing")

    monkeypatch.setattr(execute, "run_unlearning", broken)
    states = run_sweep(load_sweep(spec), log=lambda _: None)
    assert calls == [sweep.points[0].id]
    assert states[0].status == "failed" and states[0].error == "UsageError: lens file missing"
    assert states[1].status == "done"


def test_a_second_live_sweep_on_the_same_dir_is_refused(tiny_world, tmp_path):
    sweep = load_sweep(write_spec(tmp_path, base_spec(tiny_world)))
    with execute.sweep_lock(sweep.out), pytest.raises(UsageError, match="another sweep"):
        run_sweep(sweep, log=lambda _: None)


def test_sigterm_while_a_point_trains_stops_the_sweep_and_rerun_resumes(
    tiny_world, tmp_path, monkeypatch, capsys
):
    spec = write_spec(tmp_path, base_spec(tiny_world))
    first, second = load_sweep(spec).points
    log = RunDir.append_metrics
    sent = []

    def preempt_once(self, step, values):
        log(self, step, values)
        if step == 1 and not sent:  # inside the first point's training, after its first step
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunDir, "append_metrics", preempt_once)
    assert cli.main(["sweep", str(spec)]) == EXIT_PREEMPTED
    assert "stopped by SIGTERM during point " + first.id in capsys.readouterr().err
    meta = RunDir(first.run_dir).read_meta()
    assert meta.status == "preempted" and read_info(latest_checkpoint(first.run_dir))["step"] == 1
    assert not second.run_dir.exists()  # the next point never started

    assert cli.main(["sweep", str(spec)]) == 0
    assert RunDir(first.run_dir).read_meta().started == meta.started  # resumed, not restarted
    assert [inspect_point(p).status for p in (first, second)] == ["done", "done"]


def test_a_signal_outside_training_ends_the_sweep_after_that_point(
    tiny_world, tmp_path, monkeypatch, capsys
):
    spec = write_spec(tmp_path, base_spec(tiny_world, grid={"retain_coef": [1, 5, 20]}))
    points = load_sweep(spec).points
    calls: list[str] = []
    finish = fake_run(calls)

    def signalled_while_evaluating(cfg, monitor=None):
        meta = finish(cfg)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return meta

    monkeypatch.setattr(execute, "run_unlearning", signalled_while_evaluating)
    # Without the sweep's own handler SIGUSR1 would end pytest: a stand-in keeps it alive.
    stray: list[int] = []

    def stand_in(signum, frame):
        stray.append(signum)

    previous = signal.signal(signal.SIGUSR1, stand_in)
    try:
        assert cli.main(["sweep", str(spec)]) == EXIT_PREEMPTED
        assert signal.getsignal(signal.SIGUSR1) is stand_in  # the sweep restored it
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert calls == [points[0].id] and stray == []
    out = capsys.readouterr().out
    assert "| done " in out and "| pending " in out  # the table of where it stopped
    assert inspect_point(points[0]).status == "done"

    assert cli.main(["sweep", str(spec)]) == 0
    assert calls == [p.id for p in points]


def test_a_point_that_cannot_resume_is_failed_with_the_reason(tiny_world, tmp_path, monkeypatch):
    sweep = load_sweep(write_spec(tmp_path, base_spec(tiny_world, grid={"retain_coef": [1]})))
    (point,) = sweep.points
    RunDir(point.run_dir).write_run(RunMeta(point.id, "unlearn", "sequential", status="preempted"))
    (point.run_dir / "checkpoint" / "step-00000001").mkdir(parents=True)  # kept for the resume

    def damaged(cfg, monitor=None):
        raise UsageError("checkpoint X is damaged (model.pt has 3 bytes, 6 were written)")

    monkeypatch.setattr(execute, "run_unlearning", damaged)
    (state,) = run_sweep(sweep, log=lambda _: None)
    assert state.status == "failed" and "is damaged" in state.error
