"""Search logic with stand-in runs (milliseconds each): the boundary's best trial satisfies the
constraint, a rerun continues the study without repeating finished trials, an interrupted trial
is retried, and pruned or failed trials are never results."""

from __future__ import annotations

import json
import os
import signal

import yaml
from helpers import REFERENCE, RETAIN_TASKS, patch_runs, spec, write
from optuna.distributions import FloatDistribution

import unlearn.sweep.execute as execute
from unlearn.cli import main as cli
from unlearn.commands.search import main
from unlearn.errors import UsageError
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RunDir
from unlearn.runs.store import Store
from unlearn.search.outputs import collect
from unlearn.search.space import rounded
from unlearn.search.spec import Search, load_search
from unlearn.search.study import open_study
from unlearn.sweep.execute import sweep_lock
from unlearn.training.preemption import EXIT_PREEMPTED


def _trials(search):
    return collect(search, open_study(search, create=False)).trials


def test_boundary_search_finds_a_point_that_satisfies_the_constraint(
    tiny_world, tmp_path, monkeypatch, capsys
):
    calls: list[str] = []
    patch_runs(monkeypatch, calls)
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=8))
    assert main([str(path)]) == 0
    search = load_search(path)
    result = collect(search, open_study(search, create=False))
    assert len(result.trials) == 8 and len(calls) == len(set(calls)) == 8
    best = result.best
    assert best is not None and best.status == "done"
    assert all(v >= REFERENCE - 0.02 for v in best.retains.values())
    # The lowest forget among the trials that satisfy the constraint, none below it.
    feasible = [t for t in result.trials if t.feasible]
    assert best.forget == min(t.forget for t in feasible)
    assert all(t.margin < 0 for t in result.trials if t.forget < best.forget)
    # best.yaml is the best trial's run config.
    config = yaml.safe_load((search.out / "best.yaml").read_text())
    assert config["method"] == "sequential" and config["retain_coef"] == best.config["retain_coef"]
    assert config["world"] == str(tiny_world.root) and config["max_steps"] == 2
    text = (search.out / "search.md").read_text()
    assert "## Nearest the boundary" in text and f"#{best.number}" in text
    assert (search.out / "pareto.png").stat().st_size > 0
    # Every trial is a run directory indexed in the store.
    with Store(search.store) as s:
        ids = {r.id for r in s.runs() if r.kind == "unlearn"}
        baselines = [r for r in s.runs() if r.kind == "baseline"]
    assert ids == set(calls)
    assert len(baselines) == 3  # the reference and the world's other baselines, for reports
    out = capsys.readouterr().out
    assert "8 of 8 trials ended (8 done)" in out


def test_rerun_continues_without_repeating_finished_trials(tiny_world, tmp_path, monkeypatch):
    calls: list[str] = []
    patch_runs(monkeypatch, calls)
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=3))
    assert main([str(path)]) in (0, 1)
    assert len(calls) == 3
    started = {d.name: RunDir(d).read_meta().started for d in (tmp_path / "out/trials").iterdir()}
    # Same spec: the budget is spent, nothing runs.
    assert main([str(path)]) in (0, 1)
    assert len(calls) == 3
    # A larger budget continues the same study: two more trials, the first three untouched.
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=5))
    assert main([str(path)]) in (0, 1)
    assert len(calls) == 5
    search = load_search(path)
    assert [t.number for t in _trials(search)] == [0, 1, 2, 3, 4]
    for name, when in started.items():
        assert RunDir(tmp_path / "out/trials" / name).read_meta().started == when


def _killed_search(search):
    """The study a search killed in its second trial leaves: one trial told, one still
    "running" in the journal; returns the parameters of the running one."""
    with sweep_lock(search.out, "search"):
        study = open_study(search)
        space = {"retain_coef": FloatDistribution(1, 20)}
        done = study.ask(space)
        told = {
            "forget": 0.5,
            "retains": dict.fromkeys(RETAIN_TASKS, 0.95),
            "margin": 0.01,
            "method": "sequential",
            "config": {"retain_coef": done.params["retain_coef"]},
        }
        for key, value in told.items():
            done.set_user_attr(key, value)
        study.tell(done, 0.5)
        killed = study.ask(space)  # sampled its parameters, then the process died
    return killed


def test_a_killed_search_loses_only_its_trial_in_flight(tiny_world, tmp_path, monkeypatch):
    calls: list[str] = []
    patch_runs(monkeypatch, calls)
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=3))
    search = load_search(path)
    killed = _killed_search(search)
    killed_params = {"retain_coef": rounded(killed.params["retain_coef"])}
    assert main([str(path)]) == 0
    trials = _trials(search)
    by_status = {t.number: t.status for t in trials}
    assert by_status[killed.number] == "interrupted"
    # Its parameters ran again, and it did not count against the budget of 3.
    retried = [t for t in trials if t.status == "done" and t.config == killed_params]
    assert len(retried) == 1
    assert sum(1 for t in trials if t.status != "interrupted") == 3
    assert len(calls) == 2  # the retry and one new trial; the finished one was not repeated


def test_status_counts_trials_as_the_budget_does(tiny_world, tmp_path, monkeypatch, capsys):
    patch_runs(monkeypatch, [])
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=2))
    _killed_search(load_search(path))
    assert main([str(path), "--status"]) == 0
    assert "1 of 2 trials ended (1 done, 1 running)" in capsys.readouterr().out
    main([str(path)])  # the interrupted trial is retried: 3 trials, 2 of them counted
    assert main([str(path), "--status"]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 trials ended (2 done; 1 interrupted and retried, not counted)" in out


def test_pruned_and_failed_trials_are_never_results(tiny_world, tmp_path, monkeypatch):
    calls: list[str] = []
    # Trials from the fourth on report a terrible intermediate value (the median pruner lets
    # the first three finish); retain_coef values above 17 fail outright.
    patch_runs(
        monkeypatch,
        calls,
        fail=lambda cfg: cfg.method.retain_coef > 17,
        prune=lambda cfg: len(calls) > 3,
    )
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=12, pruner="median", seed=3))
    main([str(path)])
    search = load_search(path)
    result = collect(search, open_study(search, create=False))
    statuses = {t.status for t in result.trials}
    assert "pruned" in statuses and "failed" in statuses
    for t in result.trials:
        if t.status != "done":
            assert t.forget is None and t.retains == {} and t.margin is None
            run = RunDir(search.trials_dir / _run_id(t, search)).read_meta()
            assert run.status == t.status  # the run directory says pruned / failed too
    assert result.best is None or result.best.status == "done"
    text = (search.out / "search.md").read_text()
    for line in text.splitlines():
        if line.startswith("| #") and ("pruned" in line or "failed" in line):
            assert "%" not in line  # a status word, never a number
    with Store(search.store) as s:
        stored = {r.id: r.status for r in s.runs() if r.kind == "unlearn"}
    assert "pruned" in stored.values()


def _run_id(trial, search) -> str:
    study = open_study(search, create=False)
    return study.trials[trial.number].user_attrs["run_id"]


def test_status_and_dry_run_write_nothing(tiny_world, tmp_path, capsys):
    path = write(tmp_path, spec(tiny_world, tmp_path))
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "retain_coef: float [1, 20]" in out and "budget 4" in out
    assert main([str(path), "--status"]) == 0
    assert "0 of 4 trials ended" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_a_study_made_by_another_spec_is_refused(tiny_world, tmp_path, monkeypatch, capsys):
    patch_runs(monkeypatch, [])
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=1))
    main([str(path)])
    changed = spec(tiny_world, tmp_path, budget=1, space={"retain_coef": {"float": [1, 10]}})
    assert cli(["search", str(write(tmp_path, changed))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another spec" in err[0]


def test_timing_records_the_overhead(tiny_world, tmp_path, monkeypatch):
    patch_runs(monkeypatch, [])
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=2))
    main([str(path)])
    rows = [json.loads(line) for line in (tmp_path / "out/timing.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in rows] == [0, 1]
    assert all(r["overhead_s"] > 0 for r in rows)


def test_a_stop_signal_ends_the_search_after_its_trial_and_the_rerun_retries_it(
    tiny_world, tmp_path, monkeypatch
):
    calls: list[str] = []
    patch_runs(monkeypatch, calls)
    real = execute.run_unlearning

    def preempted_once(cfg, monitor=None):
        if len(calls) == 1:  # the second trial: SLURM's notice arrives, the run checkpoints
            calls.append(cfg.args.run_id)
            os.kill(os.getpid(), signal.SIGTERM)
            run = RunDir(cfg.args.out)
            run.write_run(RunMeta(cfg.args.run_id, "unlearn", "sequential", status="running"))
            return run.update(status="preempted", error="preempted by SIGTERM")
        return real(cfg, monitor)

    monkeypatch.setattr(execute, "run_unlearning", preempted_once)
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=3))
    assert main([str(path)]) == EXIT_PREEMPTED  # nothing started after the signal
    search = load_search(path)
    assert [t.status for t in _trials(search)] == ["done", "interrupted", "queued"]
    assert main([str(path)]) in (0, 1)
    trials = _trials(search)
    assert [t.status for t in trials] == ["done", "interrupted", "done", "done"]
    assert trials[2].config == trials[1].config  # the interrupted configuration, run again


def test_a_sampled_combination_no_config_accepts_is_a_failed_trial(
    tiny_world, tmp_path, monkeypatch
):
    calls: list[str] = []
    patch_runs(monkeypatch, calls)
    real = Search.point

    def point(self, method, values):
        if values["retain_coef"] > 10:  # the corners build; some inner combination does not
            raise UsageError("retain_coef: refused by the config")
        return real(self, method, values)

    monkeypatch.setattr(Search, "point", point)
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=6, sampler="random"))
    main([str(path)])
    trials = _trials(load_search(path))
    assert len(trials) == 6  # the search went on
    failed = [t for t in trials if t.status == "failed"]
    assert failed and all("refused by the config" in t.error for t in failed)
    assert len(calls) == 6 - len(failed)
