"""Run directories and the SQLite results store."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3

import pytest

from unlearn.errors import UsageError
from unlearn.runs.rows import EvalRow, MetricRow, RunMeta, eval_rows
from unlearn.runs.rundir import RunDir
from unlearn.runs.status import NO_EVALS_ERROR
from unlearn.runs.store import Store

ROWS_PER_PROC = 200
PROCS = 4


def make_run_dir(root, run_id="r1", status="done", with_evals=True):
    rd = RunDir(root / run_id)
    rd.write_run(
        RunMeta(
            id=run_id,
            kind="unlearn",
            method="lens",
            config={"retain_coef": 5.0},
            status=status,
            final={"retain": 0.25},
        )
    )
    rd.append_metrics(0, {"retain": 1.0, "forget": 2.0})
    rd.append_metrics(1, {"retain": 0.5, "forget": 1.5})
    if with_evals:
        rd.append_eval(1, "forget", {"acc": 0.3, "acc_stderr": 0.02})
        rd.append_eval(1, "retain", None, status="failed", error="lm-eval timed out")
    return rd


# -- run directory -----------------------------------------------------------------------------


def test_rundir_round_trip_and_update(tmp_path):
    rd = make_run_dir(tmp_path)
    rd.update(status="done", job_id="2021158")
    rec = rd.read()
    assert rec.meta.job_id == "2021158" and rec.meta.status == "done"
    assert rec.metrics == [
        MetricRow(0, "retain", 1.0),
        MetricRow(0, "forget", 2.0),
        MetricRow(1, "retain", 0.5),
        MetricRow(1, "forget", 1.5),
    ]
    assert rec.evals == [
        EvalRow(1, "forget", "acc", 0.3, 0.02, "done", None),
        EvalRow(1, "retain", "acc", None, None, "failed", "lm-eval timed out"),
    ]
    on_disk = json.loads(rd.run_file.read_text())
    assert on_disk["format"] == 1 and on_disk["final"] == {"retain": 0.25}


def test_rundir_rejects_bad_values(tmp_path):
    rd = make_run_dir(tmp_path)
    with pytest.raises(UsageError, match="status"):
        rd.update(status="finished")
    with pytest.raises(UsageError, match=r"unknown run\.json field"):
        rd.update(colour="red")
    with pytest.raises(UsageError, match="method"):
        RunMeta(id="x", kind="unlearn")
    with pytest.raises(UsageError, match="stderr given without"):
        rd.append_eval(2, "forget", {"acc_norm_stderr": 0.1})
    assert rd.read().meta.status == "done"  # the failed update left run.json as it was


def test_wall_seconds_needs_both_ends():
    meta = RunMeta(id="r", kind="unlearn", method="npo", started="2026-01-05T10:00:00+00:00")
    assert meta.wall_seconds() is None  # still running
    meta.finished = "2026-01-05T11:02:03+00:00"
    assert meta.wall_seconds() == 3723.0


def test_failed_and_non_finite_evals_are_never_numbers():
    rows = eval_rows(3, "forget", {"acc": float("nan"), "acc_norm": 0.5})
    assert rows[0].status == "failed" and rows[0].value is None and "non-finite" in rows[0].error
    assert rows[1] == EvalRow(3, "forget", "acc_norm", 0.5)
    failed = eval_rows(3, "retain", {"acc": 0.25}, status="failed", error="boom")
    assert failed == [EvalRow(3, "retain", "acc", None, None, "failed", "boom")]
    with pytest.raises(UsageError):
        EvalRow(0, "forget", "acc", 0.25, status="failed", error="x")


def test_torn_last_line_is_skipped_and_next_append_survives(tmp_path):
    rd = make_run_dir(tmp_path)
    with open(rd.metrics_file, "a") as f:
        f.write('{"step": 2, "name": "ret')  # a crash mid-append
    with pytest.warns(UserWarning, match="torn line"):
        assert len(rd.read().metrics) == 4
    rd.append_metrics(3, {"retain": 0.1})
    with pytest.warns(UserWarning, match="torn line"):
        metrics = rd.read().metrics
    assert metrics[-1] == MetricRow(3, "retain", 0.1) and len(metrics) == 5


def test_non_finite_loss_is_written_as_null(tmp_path):
    rd = RunDir(tmp_path / "d")
    rd.write_run(RunMeta(id="d", kind="unlearn", method="lens", final={"forget": float("inf")}))
    rd.append_metrics(0, {"forget": float("nan")})
    assert "NaN" not in rd.metrics_file.read_text()
    assert rd.read().metrics == [MetricRow(0, "forget", None)]
    assert json.loads(rd.run_file.read_text())["final"] == {"forget": None}


# -- store -------------------------------------------------------------------------------------


def table(store, sql):
    return sorted(store._conn.execute(sql).fetchall(), key=repr)


def test_ingest_twice_gives_the_same_rows(tmp_path):
    make_run_dir(tmp_path / "runs")
    make_run_dir(tmp_path / "runs", "r2", status="running", with_evals=False)
    with Store(tmp_path / "s.db") as store:
        assert store.ingest_tree(tmp_path / "runs") == {"r1": "done", "r2": "running"}
        first = [table(store, f"SELECT * FROM {t}") for t in ("runs", "metrics", "evals")]
        store.ingest_tree(tmp_path / "runs")
        store.ingest(tmp_path / "runs" / "r1")
        second = [table(store, f"SELECT * FROM {t}") for t in ("runs", "metrics", "evals")]
    assert first == second
    assert [len(rows) for rows in first] == [2, 8, 2]


def test_ingest_tree_skips_temp_dirs_and_rejects_duplicate_ids(tmp_path):
    make_run_dir(tmp_path / "runs")
    make_run_dir(tmp_path / "runs" / ".r1.tmp-abc", "r1-partial")  # atomic_dir's temp sibling
    with Store(tmp_path / "s.db") as store:
        assert store.ingest_tree(tmp_path / "runs") == {"r1": "done"}
        make_run_dir(tmp_path / "runs" / "copy", "r1")
        with pytest.raises(UsageError, match="appears twice"):
            store.ingest_tree(tmp_path / "runs")


def test_failed_eval_is_stored_with_null_value_and_error(tmp_path):
    make_run_dir(tmp_path / "runs")
    with Store(tmp_path / "s.db") as store:
        store.ingest(tmp_path / "runs" / "r1")
        final = store.final_evals("r1")
        row = table(store, "SELECT value, stderr, status, error FROM evals WHERE task = 'retain'")
        with pytest.raises(sqlite3.IntegrityError):  # the CHECK constraint itself
            store._conn.execute(
                "INSERT INTO evals VALUES ('r1', 9, 'forget', 'acc', 0.25, NULL, 'failed', 'x')"
            )
    assert row == [(None, None, "failed", "lm-eval timed out")]
    assert final["forget"]["acc"].value == 0.3 and final["forget"]["acc"].stderr == 0.02
    assert final["retain"]["acc"].status == "failed" and final["retain"]["acc"].value is None


def test_done_without_evals_is_stored_as_failed(tmp_path):
    make_run_dir(tmp_path / "runs", "r3", status="done", with_evals=False)
    with Store(tmp_path / "s.db") as store:
        assert store.ingest(tmp_path / "runs" / "r3") == "failed"
        assert store.run("r3").error == NO_EVALS_ERROR
        store.upsert_run(RunMeta(id="direct", kind="baseline", status="running"))
        assert store.set_status("direct", "done") == "failed"
        store.record_eval("direct", 0, "forget", {"acc": 0.43})
        assert store.set_status("direct", "done") == "done"
        assert store.run("direct").error is None
        assert store.upsert_run(RunMeta(id="u", kind="unlearn", method="m", status="done")) == (
            "failed"
        )
        assert store.runs(status="done")[0].id == "direct"
        with pytest.raises(UsageError, match="no run"):
            store.set_status("missing", "done")
        with pytest.raises(UsageError, match="no run"):
            store.log_metrics("missing", 0, {"x": 1.0})


def test_upsert_keeps_metrics_and_latest_eval_wins(tmp_path):
    with Store(tmp_path / "s.db") as store:
        store.upsert_run(RunMeta(id="a", kind="attack", parent="r1", status="running"))
        store.log_metrics("a", 0, {"loss": 2.0})
        store.record_eval("a", 0, "forget", {"acc": 0.25})
        store.record_eval("a", 10, "forget", {"acc": 0.40})
        store.record_eval("a", 20, "forget", None, status="failed", error="OOM")
        store.upsert_run(RunMeta(id="a", kind="attack", parent="r1", status="done"))
        assert store.metrics("a") == [MetricRow(0, "loss", 2.0)]
        assert [r.value for r in store.curve("a", "forget")] == [0.25, 0.40, None]
        assert store.final_evals("a")["forget"]["acc"].error == "OOM"


def test_not_a_store_is_a_usage_error(tmp_path):
    bad = tmp_path / "junk.db"
    bad.write_text("this is not sqlite " * 100)
    with pytest.raises(UsageError, match="not a usable results store"):
        Store(bad)


def test_foreign_sqlite_database_is_refused_untouched(tmp_path):
    from unlearn.runs.store import check_store

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
        c.execute("INSERT INTO patients (name) VALUES ('x')")
    c.close()
    before = foreign.read_bytes()
    for open_it in (Store, check_store):
        with pytest.raises(UsageError, match="not a results store"):
            open_it(foreign)
    assert foreign.read_bytes() == before
    # An empty database file (`touch results.db`) becomes a store; a store stays one.
    empty = tmp_path / "empty.db"
    empty.touch()
    check_store(empty)
    with Store(empty) as store:
        store.upsert_run(RunMeta(id="a", kind="attack", status="running"))
    check_store(empty)
    with Store(empty) as store:
        assert [r.id for r in store.runs()] == ["a"]


def test_check_store_writes_nothing(tmp_path):
    from unlearn.runs.store import check_store

    check_store(tmp_path / "new" / "results.db")
    assert not (tmp_path / "new").exists()
    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite " * 100)
    with pytest.raises(UsageError, match="not a usable results store"):
        check_store(junk)
    with pytest.raises(UsageError, match="is a directory"):
        check_store(tmp_path)


@pytest.mark.parametrize("value", ["0.3", "high", True, [0.3], float("nan")])
def test_a_done_eval_value_must_be_a_finite_number(tmp_path, value):
    with pytest.raises(UsageError):
        EvalRow(1, "forget", "acc", value)
    with pytest.raises(UsageError):
        EvalRow(1, "forget", "acc", 0.3, stderr=value)
    rd = make_run_dir(tmp_path, with_evals=False)
    row = {"step": 1, "task": "forget", "metric": "acc", "value": value, "stderr": None,
           "status": "done", "error": None}  # fmt: skip
    rd.evals_file.write_text(json.dumps(row) + "\n")
    with pytest.raises(UsageError, match=r"evals.jsonl:1: .*acc"):
        rd.read()
    assert EvalRow(1, "forget", "acc", 1).value == 1.0


def _writer(path: str, proc: int) -> None:
    with Store(path) as store:
        for i in range(ROWS_PER_PROC):
            store.log_metrics("shared", i, {f"loss{proc}": float(i)})
            store.record_eval(f"own{proc}", i, "forget", {"acc": i / ROWS_PER_PROC})


def test_concurrent_writers_lose_no_rows(tmp_path):
    path = str(tmp_path / "s.db")
    with Store(path) as store:
        store.upsert_run(RunMeta(id="shared", kind="unlearn", method="lens", status="running"))
        for p in range(PROCS):
            store.upsert_run(RunMeta(id=f"own{p}", kind="attack", status="running"))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, p)) for p in range(PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * PROCS
    with Store(path) as store:
        assert len(store.metrics("shared")) == PROCS * ROWS_PER_PROC
        for p in range(PROCS):
            curve = store.curve(f"own{p}", "forget")
            assert [r.step for r in curve] == list(range(ROWS_PER_PROC))
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
