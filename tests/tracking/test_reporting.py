"""How runs report: the lifecycle closes its trackers whatever ends the run, only rank 0
reports, values are named once for every backend; bad tracking input is one line, exit 2,
before anything loads; a sweep's points report in one group without changing their ids."""

from __future__ import annotations

import sys
from typing import ClassVar

import pytest
import yaml

from unlearn.cli import main as cli
from unlearn.distributed import Parallel
from unlearn.errors import DivergedError
from unlearn.runs.lifecycle import run_lifecycle
from unlearn.runs.rows import RunMeta, utc_now
from unlearn.runs.rundir import RunDir
from unlearn.sweep.spec import load_sweep
from unlearn.tracking import Tracker, TrackingArgs, reporter

from .helpers import attack_argv, run_argv, scalars, tracking_free


class Recorder(Tracker):
    """A backend that records what it was told."""

    opened: ClassVar[list[Recorder]] = []

    def __init__(self, args, run) -> None:
        self.args, self.run = args, run
        self.rows: list[tuple[int, dict]] = []
        self.ended: tuple | None = None
        self.closed = False
        Recorder.opened.append(self)

    def log(self, step, values):
        self.rows.append((step, values))

    def end(self, status, summary, config):
        self.ended = (status, summary, config)

    def close(self):
        self.closed = True


@pytest.fixture
def recorder(monkeypatch):
    Recorder.opened = []
    monkeypatch.setitem(reporter.TRACKERS, "tensorboard", Recorder)
    return Recorder.opened


def _lifecycle(tmp_path, body, parallel=None):
    fresh = RunMeta(id="r1", kind="unlearn", method="lens", config={"lr": 1e-3},
                    status="running", started=utc_now())  # fmt: skip
    tracking = TrackingArgs(report_to="tensorboard")
    with run_lifecycle(fresh, tmp_path / "run", parallel, tracking=tracking) as run:
        body(run)
    return run


def test_a_finished_run_reports_named_values_then_closes(tmp_path, recorder):
    def body(run):
        run.log(1, {"forget": 2.0, "lr": 1e-3})
        run.log_timing(1, {"tokens_per_s": 100.0})
        score = {"forget": ({"acc": 0.25, "acc_stderr": 0.1}, False),
                 "retain": ({"acc": 0.75}, False)}  # fmt: skip
        run.evaluate(1, ["forget", "retain"], lambda task: score[task])
        run.update(final={"forget": 2.0})

    _lifecycle(tmp_path, body)
    (t,) = recorder
    assert t.run.id == "r1" and t.run.config["lr"] == 1e-3 and t.run.resume_step == 0
    assert t.rows == [
        (1, {"train/forget": 2.0, "train/lr": 1e-3}),
        (1, {"train/tokens_per_s": 100.0}),
        (1, {"eval/forget/acc": 0.25}),  # a standard error stays in evals.jsonl
        (1, {"eval/retain/acc": 0.75}),
    ]
    status, summary, config = t.ended
    assert status == "done" and config["kind"] == "unlearn"
    assert summary == {"final/train/forget": 2.0, "final/eval/forget/acc": 0.25,
                       "final/eval/retain/acc": 0.75}  # fmt: skip
    assert t.closed
    assert [m.name for m in RunDir(tmp_path / "run").read().metrics] == ["forget", "lr"]


@pytest.mark.parametrize(("error", "status"), [(DivergedError("nan"), "diverged"),
                                               (RuntimeError("a bug"), "failed"),
                                               (KeyboardInterrupt(), "failed")])  # fmt: skip
def test_trackers_close_whatever_ends_the_run(tmp_path, recorder, error, status):
    def body(run):
        run.log(1, {"forget": 2.0})
        raise error

    try:
        _lifecycle(tmp_path, body)
    except BaseException as e:
        assert e is error
    (t,) = recorder
    assert t.ended[0] == status == RunDir(tmp_path / "run").read_meta().status
    assert t.closed


def test_only_rank_0_reports(tmp_path, recorder):
    _lifecycle(tmp_path, lambda run: run.log(1, {"forget": 1.0}), Parallel(rank=1, world_size=2))
    assert recorder == []


def test_a_tracker_that_fails_to_open_fails_the_run(tmp_path, monkeypatch):
    def broken(args, run):
        raise RuntimeError("no tracker today")

    monkeypatch.setitem(reporter.TRACKERS, "tensorboard", broken)
    with pytest.raises(RuntimeError, match="no tracker today"):
        _lifecycle(tmp_path, lambda run: None)
    meta = RunDir(tmp_path / "run").read_meta()
    assert meta.status == "failed" and "no tracker today" in meta.error  # never left running


# -- bad input: one line, exit 2, before anything loads ------------------------------------------


def _refused(capsys, argv, *words):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err


@pytest.mark.parametrize("command", ["run", "attack", "distill", "robustness", "sweep", "search"])
def test_unknown_tracker_is_refused(tiny_world, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv = {
        "run": run_argv(tiny_world, out),
        "attack": attack_argv(tiny_world, out),
        "distill": ["distill", "--teacher", str(tiny_world.target), "--world",
                    str(tiny_world.root), "--out", str(out)],
        "robustness": ["robustness", "--model", str(tiny_world.target), "--world",
                       str(tiny_world.root), "--out", str(out)],
        "sweep": ["sweep", str(tmp_path / "spec.yaml")],
        "search": ["search", str(tmp_path / "spec.yaml")],
    }[command]  # fmt: skip
    _refused(capsys, [*argv, "--report_to", "comet"], "unknown --report_to 'comet'")
    assert not out.exists()


@pytest.mark.parametrize(("backend", "command"), [("wandb", "attack"), ("tensorboard", "run")])
def test_a_tracker_not_installed_is_refused_before_weights_load(
    tiny_world, tmp_path, capsys, monkeypatch, backend, command
):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the tracking flags were checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    monkeypatch.setitem(sys.modules, backend, None)  # what an environment without it looks like
    out = tmp_path / "out"
    argv = (run_argv if command == "run" else attack_argv)(tiny_world, out)
    _refused(capsys, [*argv, "--report_to", backend], f"pip install 'unlearn[{backend}]'")
    assert not out.exists()


# -- sweeps: one group, the same points ------------------------------------------------------------


def _spec(tiny_world, tmp_path, **base) -> str:
    spec = {"name": "s", "world": str(tiny_world.root), "method": "sequential",
            "base": {"num_train_examples": 4, "pdbs": 2, "grad_accum": 1, "max_steps": 1,
                     "num_phases": 1, "progress": False, **base},
            "grid": {"retain_coef": [1, 5]}, "eval": {"eval_limit": 8}}  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_sweep_points_report_in_one_group_of_the_project(tiny_world, tmp_path):
    spec, board = _spec(tiny_world, tmp_path), tmp_path / "board"
    ids = [p.id for p in load_sweep(spec).points]
    flags = ["--report_to", "tensorboard", "--tracking_dir", str(board), "--project", "p"]
    assert cli(["sweep", spec, *flags]) == 0
    assert [p.id for p in load_sweep(spec).points] == ids  # tracking is not part of a point
    assert sorted(d.name for d in (board / "p" / "s").iterdir()) == sorted(ids)
    for point in load_sweep(spec).points:
        logged = scalars(board / "p" / "s" / point.id)  # the sweep's name is the group
        assert [s for s, _ in logged["train/forget"]] == [1]
        assert "final/eval/forget/acc" in logged
        assert tracking_free(RunDir(point.run_dir).read_meta().config)


def test_sweep_tracking_comes_from_the_command_line(tiny_world, tmp_path, capsys):
    spec = _spec(tiny_world, tmp_path)
    _refused(capsys, ["sweep", spec, "--run_name", "x"], "--run_name names one run")
    spec = _spec(tiny_world, tmp_path, report_to="tensorboard")
    _refused(capsys, ["sweep", spec], "report_to", "set on the command line")


def test_search_trials_and_baselines_report_in_one_group(tiny_world, tmp_path):
    spec, board = tmp_path / "search.yaml", tmp_path / "board"
    spec.write_text(yaml.safe_dump({
        "name": "srch", "world": str(tiny_world.root), "out": str(tmp_path / "out"),
        "method": "sequential", "goal": "boundary", "budget": 1, "pruner": "none",
        "base": {"num_train_examples": 4, "pdbs": 2, "grad_accum": 1, "max_steps": 1,
                 "num_phases": 1, "progress": False},
        "space": {"lr": {"log": [2e-3, 3e-3]}},
    }))  # fmt: skip
    flags = ["--report_to", "tensorboard", "--tracking_dir", str(board), "--project", "p"]
    assert cli(["search", str(spec), *flags]) in (0, 1)  # 1: the one trial is not a best
    runs = {d.name for d in (tmp_path / "out" / "trials").iterdir() if RunDir(d).exists()}
    (trial,) = [r for r in runs if r.startswith("sequential-")]
    reported = {d.name for d in (board / "p" / "srch").iterdir()}
    assert trial in reported and any(r.startswith("baseline-") for r in reported)
    assert [s for s, _ in scalars(board / "p" / "srch" / trial)["train/forget"]] == [1]
