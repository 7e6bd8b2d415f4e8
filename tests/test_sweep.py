"""Sweeps: spec validation, grid expansion and ids, the local executor, resume, the CLI."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
import yaml

from unlearn import cli
from unlearn import sweep as sweep_mod
from unlearn.errors import UsageError
from unlearn.resume import EXIT_PREEMPTED, latest_checkpoint, read_info
from unlearn.runs.rundir import RunDir, RunMeta, utc_now
from unlearn.runs.store import Store
from unlearn.sweep import inspect_point, load_sweep, run_sweep

TINY = {
    "num_train_examples": 8,
    "pdbs": 2,
    "grad_accum": 1,
    "max_steps": 2,
    "progress": False,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Training on 2 threads slows down ~10x when another process holds the other core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def base_spec(world, **extra) -> dict:
    return {
        "name": "s",
        "world": str(world.root),
        "method": "sequential",
        "base": dict(TINY),
        "grid": {"retain_coef": [1, 5]},
        **extra,
    }


# -- validation ---------------------------------------------------------------------------------


BAD_SPECS = [
    ({"grdi": {"lr": [1]}}, "unknown key(s) grdi"),
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"base": {**TINY, "retain_coeff": 1}}, "retain_coeff"),
    ({"attack": {"lrr": 1}}, "unknown attack config field(s): lrr"),
    ({"grid": {"lr": [1e-3, -1]}}, "--lr must be > 0"),
    ({"base": {**TINY, "max_steps": 2.5}}, "max_steps must be an integer"),
    ({"base": {**TINY, "out": "x"}}, "out set by the sweep"),
    ({"grid": {"lr": 0.001}}, "grid.lr must be a non-empty list"),
    ({"base": {**TINY, "layers": [99]}}, "--layers [99] outside"),
    ({"base": {**TINY, "merge": False}, "attack": {}}, "needs the merged model"),
    ({"sweeps": [{"method": "lens"}]}, "go inside its blocks"),
    ({"grid": {"retain_coef": [5, 5.0]}}, "have the same configuration"),
    ({"base": {**TINY, "lora_target_modules": ["qkv"]}}, "no module named 'qkv'"),
    ({"attack": {"lora": True, "lora_target_modules": ["dense", "x"]}}, "no module named 'x'"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SPECS)
def test_bad_spec_is_rejected_before_anything_is_written(tiny_world, tmp_path, change, message):
    spec = write_spec(tmp_path, {**base_spec(tiny_world), **change})
    with pytest.raises(UsageError) as e:
        load_sweep(spec)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s").exists()


def test_world_is_required_and_must_be_a_world(tiny_world, tmp_path):
    spec = base_spec(tiny_world)
    del spec["world"]
    with pytest.raises(UsageError, match="world"):
        load_sweep(write_spec(tmp_path, spec))
    (tmp_path / "notaworld").mkdir()
    with pytest.raises(UsageError, match="not a world directory"):
        load_sweep(write_spec(tmp_path, {**spec, "world": "notaworld"}))  # relative to the spec


def test_duplicate_yaml_keys_are_an_error(tiny_world, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"world: {tiny_world.root}\nmethod: sequential\nbase: {{lr: 1.0e-3, lr: 1.0e-2}}\n"
    )
    with pytest.raises(UsageError, match="duplicate key"):
        load_sweep(spec)


# -- expansion and ids --------------------------------------------------------------------------


def test_grid_expansion_and_deterministic_ids(tiny_world, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: g\nworld: {tiny_world.root}\n"
        "base: {num_train_examples: 8, lr: 1e-3}\n"  # 1e-3 is a float here, not YAML 1.1's str
        "sweeps:\n"
        "  - method: sequential\n"
        "    grid: {retain_coef: [1, 5], remove_coef: [5, 20, 30]}\n"
        "  - method: checkpoint_transfer\n"
        "    points: [{retain_coef: 2, remove_coef: 5}, {retain_coef: 20, remove_coef: 5}]\n"
        "    grid: {max_steps: [2]}\n"
    )
    sweep = load_sweep(spec)
    ids = [p.id for p in sweep.points]
    assert len(ids) == 2 * 3 + 2 and len(set(ids)) == len(ids)
    assert ids[0].startswith("sequential-rc1-rm5-") and ids[5].startswith("sequential-rc5-rm30-")
    assert ids[6].startswith("checkpoint_transfer-rc2-rm5-steps2-")
    assert all(len(i.rsplit("-", 1)[1]) == 6 for i in ids)
    assert sweep.points[0].run_config.train.lr == 1e-3
    assert sweep.points[1].run_config.method.remove_coef == 20.0
    assert sweep.out == tmp_path / "g" and sweep.store == tmp_path / "g" / "store.sqlite"
    assert sweep.points[0].run_dir == tmp_path / "g" / ids[0]
    assert [p.id for p in load_sweep(spec).points] == ids  # same spec, same ids

    # 5 and 5.0 are one configuration; a different base value is another one.
    spec.write_text(spec.read_text().replace("[5, 20, 30]", "[5.0, 20, 30]"))
    assert [p.id for p in load_sweep(spec).points] == ids
    spec.write_text(spec.read_text().replace("lr: 1e-3", "lr: 2e-3"))
    changed = [p.id for p in load_sweep(spec).points]
    assert changed[0] != ids[0] and changed[0].rsplit("-", 1)[0] == ids[0].rsplit("-", 1)[0]


def test_attack_points_at_the_run_model(tiny_world, tmp_path):
    sweep = load_sweep(write_spec(tmp_path, base_spec(tiny_world, attack={"max_steps": 3})))
    p = sweep.points[0]
    assert p.attack_dir == sweep.out / f"{p.id}-attack"
    assert p.attack_config.args.parent == p.id
    assert p.attack_config.args.model == str(p.run_dir / "model")
    assert p.attack_config.train.max_steps == 3
    copy = pickle.loads(pickle.dumps(p))  # what a cluster executor ships to a job
    assert copy.run_config == p.run_config and copy.attack_config == p.attack_config


# -- running ------------------------------------------------------------------------------------


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
    real_attack = sweep_mod.run_attack
    monkeypatch.setattr(sweep_mod, "run_unlearning", lambda cfg: calls.append(cfg.args.run_id))
    monkeypatch.setattr(sweep_mod, "run_attack", lambda cfg: calls.append(cfg) or real_attack(cfg))
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


def fake_run(calls: list[str], fail=(), interrupt=()):
    """A stand-in for run_unlearning that writes a finished run dir in milliseconds.
    `fail`/`interrupt` are retain_coef values that raise RuntimeError / get killed mid-run."""

    def run(cfg):
        pid, coef = cfg.args.run_id, cfg.method.retain_coef
        calls.append(pid)
        run_dir = RunDir(cfg.args.out)
        run_dir.write_run(RunMeta(pid, "unlearn", cfg.args.method, status="running"))
        if coef in interrupt:  # a kill: the run never gets to record anything
            raise KeyboardInterrupt
        if coef in fail:
            run_dir.update(status="failed", error="RuntimeError: boom", finished=utc_now())
            raise RuntimeError("boom")
        run_dir.append_eval(2, "forget", {"acc": 0.25})
        run_dir.append_eval(2, "retain", {"acc": 0.5 + coef / 100})
        return run_dir.update(status="done", finished=utc_now())

    return run


def test_resume_after_a_kill_runs_only_the_rest(tiny_world, tmp_path, monkeypatch):
    spec = write_spec(tmp_path, base_spec(tiny_world, grid={"retain_coef": [1, 5, 20]}))
    sweep = load_sweep(spec)
    first, second, third = sweep.points
    calls: list[str] = []
    monkeypatch.setattr(sweep_mod, "run_unlearning", fake_run(calls, interrupt=(5.0,)))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, log=lambda _: None)
    assert calls == [first.id, second.id]
    assert RunDir(second.run_dir).read_meta().status == "running"
    assert [inspect_point(p).status for p in sweep.points] == ["done", "running", "pending"]

    calls.clear()
    lines: list[str] = []
    monkeypatch.setattr(sweep_mod, "run_unlearning", fake_run(calls))
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

    def run(cfg):  # what the store and run dir say when the retry starts
        if cfg.args.run_id == p.id:
            with Store(sweep.store) as store:
                seen["store"] = (store.run(p.id).status, store.run(p.id).error)
            seen["dir_cleared"] = not p.run_dir.exists()
        return fake_run([])(cfg)

    monkeypatch.setattr(sweep_mod, "run_unlearning", run)
    run_sweep(sweep, log=lambda _: None)
    assert seen == {"store": ("failed", "interrupted"), "dir_cleared": True}


def test_a_failing_point_does_not_stop_the_next(tiny_world, tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path, base_spec(tiny_world))
    sweep = load_sweep(spec)
    calls: list[str] = []
    monkeypatch.setattr(sweep_mod, "run_unlearning", fake_run(calls, fail=(1.0,)))
    states = run_sweep(sweep, log=lambda _: None)
    assert calls == [p.id for p in sweep.points]
    assert [s.status for s in states] == ["failed", "done"]
    assert "boom" in states[0].error and "RuntimeError: boom" in capsys.readouterr().err
    with Store(sweep.store) as store:
        assert store.run(sweep.points[0].id).status == "failed"

    # A run that raises before writing run.json is still recorded; retries touch failed only.
    calls.clear()

    def broken(cfg):
        calls.append(cfg.args.run_id)
        raise UsageError("lens file missing")

    monkeypatch.setattr(sweep_mod, "run_unlearning", broken)
    states = run_sweep(load_sweep(spec), log=lambda _: None)
    assert calls == [sweep.points[0].id]
    assert states[0].status == "failed" and states[0].error == "UsageError: lens file missing"
    assert states[1].status == "done"


def test_a_second_live_sweep_on_the_same_dir_is_refused(tiny_world, tmp_path):
    sweep = load_sweep(write_spec(tmp_path, base_spec(tiny_world)))
    with sweep_mod._sweep_lock(sweep.out), pytest.raises(UsageError, match="another sweep"):
        run_sweep(sweep, log=lambda _: None)


# -- the command line ---------------------------------------------------------------------------


def test_cli_bad_spec_exits_2_with_one_line(tiny_world, tmp_path, capsys):
    spec = write_spec(tmp_path, {**base_spec(tiny_world), "method": "nope"})
    assert cli.main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unlearn sweep: error:") and "unknown method" in err
    assert "\n" not in err
    assert cli.main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert not (tmp_path / "s").exists()


def test_cli_dry_run_and_status(tiny_world, tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path, base_spec(tiny_world))
    ids = [p.id for p in load_sweep(spec).points]
    assert cli.main(["sweep", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids) and "retain_coef=1.0" in out
    assert not (tmp_path / "s").exists()

    monkeypatch.setattr(sweep_mod, "run_unlearning", fake_run([], fail=(5.0,)))
    assert cli.main(["sweep", str(spec)]) == 1  # a point failed
    capsys.readouterr()
    assert cli.main(["sweep", str(spec), "--status"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "| done " in rows[ids[0]] and "0.250" in rows[ids[0]]
    assert "| failed " in rows[ids[1]]
    assert "1 done, 1 failed" in out


def test_status_shows_a_running_attacks_status_not_its_partial_curve(tiny_world, tmp_path, capsys):
    spec = write_spec(tmp_path, base_spec(tiny_world, attack={"max_steps": 4}))
    sweep = load_sweep(spec)
    for p in sweep.points:
        fake_run([])(p.run_config)
    first, second = sweep.points
    attack = RunDir(first.attack_dir)
    config = first.attack_config.to_dict()
    attack.write_run(RunMeta(f"{first.id}-attack", "attack", config=config, status="running"))
    attack.append_eval(0, "forget", {"acc": 0.875})  # step 0 of a curve still being drawn
    assert inspect_point(first).attacked_forget is None
    assert cli.main(["sweep", str(spec), "--status"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    cells = [c.strip() for c in rows[first.id].split("|")[1:-1]]
    assert cells[4:] == ["running", "running"] and "0.875" not in out
    cells = [c.strip() for c in rows[second.id].split("|")[1:-1]]
    assert cells[4:] == ["pending", "pending"]


def test_points_are_counted_before_they_are_built(tiny_world, tmp_path, monkeypatch, capsys):
    built = []
    real_point = sweep_mod._point

    def counted(*args):
        built.append(1)
        assert len(built) <= 10, "the grid is being expanded"
        return real_point(*args)

    monkeypatch.setattr(sweep_mod, "_point", counted)
    huge = {f: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] for f in ("retain_coef", "remove_coef", "lr")}
    huge |= {"seed": list(range(10_000))}  # 10^7 points
    spec = write_spec(tmp_path, base_spec(tiny_world, grid=huge))
    assert cli.main(["sweep", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "10,000,000 points" in err and "--max_points" in err and "\n" not in err
    assert built == [] and not (tmp_path / "s").exists()

    # The cap is a default, not a wall: --max_points moves it (both ways).
    spec = write_spec(tmp_path, base_spec(tiny_world, grid={"retain_coef": [1, 2, 3]}))
    assert cli.main(["sweep", str(spec), "--dry-run", "--max_points", "2"]) == 2
    assert "3 points" in capsys.readouterr().err
    assert cli.main(["sweep", str(spec), "--dry-run", "--max_points", "3"]) == 0
    assert len(load_sweep(spec, max_points=3).points) == 3
    assert sweep_mod.MAX_POINTS == 1000  # the CLI's default repeats it (docs/sweeps.md too)
    assert cli.main(["sweep", str(spec), "--max_points", "0"]) == 2
    assert "--max_points must be >= 1" in capsys.readouterr().err


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

    def signalled_while_evaluating(cfg):
        meta = finish(cfg)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return meta

    monkeypatch.setattr(sweep_mod, "run_unlearning", signalled_while_evaluating)
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

    def damaged(cfg):
        raise UsageError("checkpoint X is damaged (model.pt has 3 bytes, 6 were written)")

    monkeypatch.setattr(sweep_mod, "run_unlearning", damaged)
    (state,) = run_sweep(sweep, log=lambda _: None)
    assert state.status == "failed" and "is damaged" in state.error
