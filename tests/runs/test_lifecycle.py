"""The one run lifecycle (unlearn.runs.lifecycle) and its status rules (unlearn.runs.status):
every way a run can end maps to one status, written to run.json and to the store."""

from __future__ import annotations

import signal

import pytest

from unlearn.distributed import Parallel
from unlearn.errors import DivergedError, Preempted, RetainZeroError, SaveFailed, UsageError
from unlearn.runs.lifecycle import mark_failed, run_lifecycle
from unlearn.runs.rows import RunMeta, utc_now
from unlearn.runs.rundir import RunDir
from unlearn.runs.status import (
    NO_EVALS_ERROR,
    OUTCOMES,
    effective_status,
    error_text,
    outcome_of,
    worse,
)
from unlearn.runs.store import Store


def _fresh(kind: str = "unlearn") -> RunMeta:
    return RunMeta(id="r1", kind=kind, method="lens" if kind == "unlearn" else None,
                   status="running", started=utc_now())  # fmt: skip


def _end_with(tmp_path, error: BaseException):
    """Raise `error` inside a lifecycle; returns (what escaped, run.json, the store's row)."""
    escaped = None
    try:
        with run_lifecycle(_fresh(), tmp_path / "run", store=tmp_path / "s.db") as run:
            run.log(1, {"loss": 1.0})
            raise error
    except BaseException as e:
        escaped = e
    with Store(tmp_path / "s.db") as store:
        stored = store.run("r1")
    return escaped, run, RunDir(tmp_path / "run").read_meta(), stored


EXPECTED = [
    (Preempted(3, signal.SIGTERM, "ck"), "preempted", False, False),
    (DivergedError("loss is nan"), "diverged", True, False),
    (RetainZeroError("retain stayed 0"), "failed", True, False),
    (SaveFailed("saving the model failed: disk full"), "failed", True, False),
    (RuntimeError("a bug"), "failed", True, True),
    (KeyboardInterrupt(), "failed", True, True),
]


@pytest.mark.parametrize(("error", "status", "finished", "reraised"), EXPECTED)
def test_each_way_a_run_ends_has_one_status(tmp_path, error, status, finished, reraised):
    escaped, run, meta, stored = _end_with(tmp_path, error)
    assert (escaped is error) == reraised
    assert meta.status == stored.status == run.meta.status == status
    assert (meta.finished is not None) == finished
    assert meta.error == stored.error == error_text(error)
    # Expected endings keep their message; unexpected ones say what they were.
    assert meta.error.startswith(type(error).__name__) == reraised


def test_the_table_is_ordered_and_ends_with_a_catch_all():
    assert OUTCOMES[-1][0] is BaseException
    assert outcome_of(ValueError("x")).reraise
    assert outcome_of(Preempted(1, signal.SIGUSR1, "ck")).status == "preempted"
    # SaveFailed is a RuntimeError, and matched by its own row (not the catch-all).
    assert not outcome_of(SaveFailed("x")).reraise


def test_a_clean_run_is_done_indexed_and_its_rows_kept(tmp_path):
    with run_lifecycle(_fresh(), tmp_path / "run", store=tmp_path / "s.db") as run:
        run.log(1, {"loss": 0.5})
        assert run.evaluate(1, ["forget"], lambda task: ({"acc": 0.25}, False)) == "done"
    record = RunDir(tmp_path / "run").read()
    assert record.meta.status == run.meta.status == "done" and record.meta.finished
    assert [(m.name, m.value) for m in record.metrics] == [("loss", 0.5)]
    with Store(tmp_path / "s.db") as store:
        assert store.run("r1").status == "done"
        assert [(e.task, e.value) for e in store.evals("r1")] == [("forget", 0.25)]


def test_evaluations_make_the_status_worse_failed_wins(tmp_path):
    results = {"a": ({"acc": 0.9}, True), "b": None, "c": ({"acc": 0.3}, False)}

    def score(task):
        if results[task] is None:
            raise RuntimeError("scorer crashed")
        return results[task]

    with run_lifecycle(_fresh(), tmp_path / "run") as run:
        assert run.evaluate(5, ["a"], score) == "collapsed"
        assert run.evaluate(5, ["b", "c"], score) == "failed"
    record = RunDir(tmp_path / "run").read()
    assert record.meta.status == "failed"
    failed = [e for e in record.evals if e.task == "b"]
    assert failed[0].status == "failed" and failed[0].value is None
    assert failed[0].error == "RuntimeError: scorer crashed"
    assert {e.task for e in record.evals if e.value is not None} == {"a", "c"}


def test_a_task_without_acc_is_a_result_and_its_failure_keeps_its_metric(tmp_path):
    """A perplexity task has ppl, nll and tokens (no acc): a done result; when it fails, the
    failed row is named by the task's own metric, so a report shows a failed ppl, not an acc."""
    results = {"general_ppl": ({"ppl": 3.42, "nll": 1.23, "tokens": 90.0}, False), "p2": None}

    def score(task):
        if results[task] is None:
            raise ValueError("no document tokens to predict")
        return results[task]

    metric = {"general_ppl": "ppl", "p2": "ppl"}.get
    with run_lifecycle(_fresh(), tmp_path / "run", store=tmp_path / "s.db") as run:
        assert run.evaluate(0, ["general_ppl"], score, metric) == "done"
    assert RunDir(tmp_path / "run").read_meta().status == "done"
    with run_lifecycle(_fresh(), tmp_path / "run2") as run:
        assert run.evaluate(0, ["p2"], score, metric) == "failed"
    (row,) = RunDir(tmp_path / "run2").read().evals
    assert (row.metric, row.status, row.value) == ("ppl", "failed", None)
    with Store(tmp_path / "s.db") as store:
        assert {m: r.value for m, r in store.final_evals("r1")["general_ppl"].items()} == {
            "ppl": 3.42,
            "nll": 1.23,
            "tokens": 90.0,
        }


def test_a_collapse_marks_an_unlearning_run_but_not_an_attack(tmp_path):
    for kind, expected in (("unlearn", "collapsed"), ("baseline", "collapsed"), ("attack", "done")):
        with run_lifecycle(_fresh(kind), tmp_path / kind) as run:
            run.evaluate(0, ["forget"], lambda task: ({"acc": 0.25}, True))
        assert RunDir(tmp_path / kind).read_meta().status == expected


def test_a_refused_save_is_a_failed_run_in_one_line(tmp_path):
    class FullDisk(Parallel):
        def save_model(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

    with run_lifecycle(_fresh(), tmp_path / "run") as run:
        run.save_model(FullDisk(), model=None, tokenizer=None, merge=True)
    meta = RunDir(tmp_path / "run").read_meta()
    assert meta.status == "failed"
    assert meta.error == "saving the model failed: [Errno 28] No space left on device"


def test_the_status_belongs_to_the_lifecycle(tmp_path):
    with pytest.raises(ValueError), run_lifecycle(_fresh(), tmp_path / "run") as run:
        run.update(status="done")
    assert RunDir(tmp_path / "run").read_meta().status == "failed"  # the ValueError escaped


def test_a_resumed_run_keeps_its_recorded_failures(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.write_run(_fresh())
    run_dir.append_eval(0, "forget", None, status="failed", error="boom")

    class Resume:  # a checkpointer that finds a checkpoint at step 0
        def find(self):
            return {"step": 0}

        def discard(self):
            self.discarded = True

    ck = Resume()
    with run_lifecycle(_fresh(), tmp_path / "run", checkpointer=ck) as run:
        run.evaluate(1, ["forget"], lambda task: ({"acc": 0.5}, False))
    assert RunDir(tmp_path / "run").read_meta().status == "failed"
    assert ck.discarded


def test_effective_status_and_worse():
    assert effective_status("done", has_evals=False) == ("failed", NO_EVALS_ERROR)
    assert effective_status("done", has_evals=True) == ("done", None)
    assert effective_status("diverged", has_evals=False) == ("diverged", None)
    assert worse("done", "collapsed") == worse("collapsed", "done") == "collapsed"
    assert worse("failed", "collapsed") == worse("collapsed", "failed") == "failed"


def test_mark_failed_only_touches_runs_that_did_not_end(tmp_path):
    fresh = _fresh()
    assert mark_failed(tmp_path / "a", "crashed", fresh=fresh)  # no run.json: written
    assert RunDir(tmp_path / "a").read_meta().status == "failed"
    assert not mark_failed(tmp_path / "b", "crashed")  # nothing to write it from
    for status, unfinished, changed in (
        ("running", ("running",), True),
        ("preempted", ("running",), False),
        ("preempted", ("running", "preempted"), True),
        ("done", ("running", "pending", "preempted"), False),
    ):
        run = RunDir(tmp_path / status / str(len(unfinished)))
        run.write_run(RunMeta(id="r", kind="unlearn", method="lens", status=status))
        assert mark_failed(run.path, "interrupted", unfinished=unfinished) == changed
        assert run.read_meta().status == ("failed" if changed else status)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("{not json")
    assert not mark_failed(tmp_path / "bad", "interrupted")  # unreadable: readers say failed
    with pytest.raises(UsageError):
        RunDir(tmp_path / "bad").read_meta()
