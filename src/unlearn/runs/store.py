"""The results store: one SQLite file indexing runs, their logged metrics and their evaluations.

    runs     (id, kind, method, config, status, created, started, finished, job_id, model_path,
              parent, run_dir, error, final)
    metrics  (run_id, step, name, value)                       key (run_id, step, name)
    evals    (run_id, step, task, metric, value, stderr, status, error)
                                                                key (run_id, step, task, metric)

Design choices:
- Run directories (`unlearn.runs.rundir`) are the source of truth; `ingest` replaces everything the
  store knows about a run with what its directory holds, so ingesting twice gives the same rows
  and the store can always be rebuilt with `ingest_tree`. Processes on one machine (a local
  sweep) may also write directly with `upsert_run` / `log_metrics` / `record_eval`.
- WAL journal (readers never block the writer), a 30 s busy timeout, foreign keys on. Every write
  is one short `BEGIN IMMEDIATE` transaction (the write lock is taken up front, so two writers
  cannot deadlock upgrading read locks), retried with backoff if SQLite still reports busy.
  synchronous=NORMAL: in WAL mode a process crash loses nothing; a power cut may lose the last
  commits, which re-ingesting the run directories restores.
- Do not put the store file on NFS/Lustre (SQLite locking is unsafe there); keep it on a local
  disk and ingest the run directories from the shared filesystem.
- Invariant: no run is stored as "done" without at least one eval row. `upsert_run`,
  `set_status` and `ingest` store such a run as "failed" with error "no eval results" (they do
  not raise: a finishing job or a tree ingest must not crash over it) and return the status
  actually stored. A failed eval is a row with status "failed" and a NULL value, enforced by a
  CHECK constraint.
- A connection belongs to one process and thread: open one `Store` per process.
- A store is created only in a new or empty database file. A non-empty SQLite database without
  our tables is someone else's and is refused untouched (`check_store` lets commands find that,
  or a file that is no database at all, before they write a run directory or load weights).

Size: ~450 lines, one SQLite schema and its transactions (writes, retries on a busy file,
ingest, queries); splitting reads from writes would split the schema.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from unlearn.errors import UsageError
from unlearn.fsutil import check_writable_parent
from unlearn.runs.rows import (
    EVAL_STATUSES,
    KINDS,
    STATUSES,
    EvalRow,
    MetricRow,
    RunMeta,
    RunRecord,
    eval_rows,
)
from unlearn.runs.rundir import RunDir
from unlearn.runs.status import effective_status

SCHEMA_VERSION = 3
"""2 added the probe and robustness run kinds, 3 the status pruned; an
older store is migrated in place when opened (`_migrate`), its rows kept."""
MIGRATED = (1, 2)
"""Schema versions `_migrate` brings to SCHEMA_VERSION."""
BUSY_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 6

T = TypeVar("T")


def _in(values: Sequence[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


_RUNS_TABLE = f"""
CREATE TABLE IF NOT EXISTS {{table}} (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ({_in(KINDS)})),
    method TEXT,
    config TEXT NOT NULL DEFAULT '{{{{}}}}',
    status TEXT NOT NULL CHECK (status IN ({_in(STATUSES)})),
    created TEXT,
    started TEXT,
    finished TEXT,
    job_id TEXT,
    model_path TEXT,
    parent TEXT,
    run_dir TEXT,
    error TEXT,
    final TEXT NOT NULL DEFAULT '{{{{}}}}'
)
"""

_SCHEMA = (
    _RUNS_TABLE.format(table="runs")
    + f""";
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, step, name)
);
CREATE TABLE IF NOT EXISTS evals (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    stderr REAL,
    status TEXT NOT NULL CHECK (status IN ({_in(EVAL_STATUSES)})),
    error TEXT,
    PRIMARY KEY (run_id, step, task, metric),
    CHECK ((status = 'done' AND value IS NOT NULL AND error IS NULL)
           OR (status = 'failed' AND value IS NULL AND error IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS runs_by_kind ON runs (kind, method, status);
"""
)

_RUN_COLUMNS = (
    "id", "kind", "method", "config", "status", "created", "started", "finished", "job_id",
    "model_path", "parent", "run_dir", "error", "final",
)  # fmt: skip


@dataclass
class StoredRun(RunMeta):
    """A run as the store holds it: run.json's fields plus where its directory is (if any)."""

    run_dir: str | None = None


def _is_busy(e: sqlite3.OperationalError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(e) or "busy" in str(e)


class Store:
    """One SQLite results store; use as a context manager or call `close()`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            self._retry(self._setup)
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise UsageError(f"{self.path} is not a usable results store: {e}") from None
        except BaseException:
            self._conn.close()
            raise

    def _setup(self) -> None:
        c = self._conn
        c.execute("PRAGMA foreign_keys = ON")
        # Before anything writes (the journal mode is recorded in the file): a database that is
        # not a store must be left byte for byte as it was.
        _check_schema(c, self.path)
        c.execute("PRAGMA journal_mode = WAL")
        _migrate(c)
        c.execute("PRAGMA synchronous = NORMAL")
        with _immediate(c):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------

    def _retry(self, fn: Callable[[], T]) -> T:
        """Run fn, retrying with jittered exponential backoff while SQLite reports busy."""
        for attempt in range(MAX_ATTEMPTS):
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or attempt == MAX_ATTEMPTS - 1:
                    raise
                time.sleep(min(5.0, 0.05 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn inside one short write transaction (retried as a whole when busy)."""

        def attempt() -> T:
            with _immediate(self._conn):
                return fn(self._conn)

        return self._retry(attempt)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._retry(lambda: self._conn.execute(sql, params).fetchall())

    # -- writes ------------------------------------------------------------------------------

    def upsert_run(self, run: RunMeta, run_dir: str | os.PathLike | None = None) -> str:
        """Insert or replace a run's row (its metrics and evals are kept); returns the status
        stored ("failed" instead of "done" when the run has no eval rows)."""

        def tx(c: sqlite3.Connection) -> str:
            _upsert(c, run, None if run_dir is None else str(run_dir))
            return _enforce_done_has_evals(c, run.id)

        return self._write(tx)

    def set_status(self, run_id: str, status: str, error: str | None = None) -> str:
        """Set a run's status (and error text); returns the status stored (see the invariant)."""
        if status not in STATUSES:
            raise UsageError(f"run status must be one of {', '.join(STATUSES)}, got {status!r}")

        def tx(c: sqlite3.Connection) -> str:
            cur = c.execute(
                "UPDATE runs SET status = ?, error = ? WHERE id = ?", (status, error, run_id)
            )
            if cur.rowcount == 0:
                raise UsageError(f"no run {run_id!r} in {self.path}")
            return _enforce_done_has_evals(c, run_id)

        return self._write(tx)

    def log_metrics(self, run_id: str, step: int, values: dict[str, Any]) -> None:
        """Record named values at one step (a repeated (step, name) replaces the old value)."""
        rows = [MetricRow(step, name, value) for name, value in values.items()]
        self._write(lambda c: _insert_metrics(c, run_id, rows, self.path))

    def record_eval(
        self,
        run_id: str,
        step: int,
        task: str,
        metrics: dict[str, Any] | None,
        status: str = "done",
        error: str | None = None,
    ) -> list[EvalRow]:
        """Record one task's evaluation at `step` (see `unlearn.runs.rundir.eval_rows`)."""
        rows = eval_rows(step, task, metrics, status, error)
        self._write(lambda c: _insert_evals(c, run_id, rows, self.path))
        return rows

    def ingest(self, run_dir: str | os.PathLike) -> str:
        """Index one run directory, replacing what the store had for that run; returns the
        status stored. Idempotent."""
        record = RunDir(run_dir).read()
        return self._write(lambda c: _ingest(c, record, self.path))

    def ingest_tree(self, root: str | os.PathLike) -> dict[str, str]:
        """Ingest every run directory under `root` (hidden and temporary directories skipped);
        returns {run id: status stored}. Every directory is read and validated first, so a bad
        one is refused before anything is stored."""
        return self.ingest_records(read_tree(root))

    def ingest_records(self, records: Sequence[RunRecord]) -> dict[str, str]:
        """Index run directories already read (`read_tree`); returns {run id: status stored}."""
        return {r.meta.id: self._write(lambda c, r=r: _ingest(c, r, self.path)) for r in records}

    # -- reads -------------------------------------------------------------------------------

    def runs(
        self, kind: str | None = None, method: str | None = None, status: str | None = None
    ) -> list[StoredRun]:
        """Runs matching all the given filters, oldest first (ties in insertion order)."""
        where, params = [], []
        for column, value in (("kind", kind), ("method", method), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created, rowid"
        return [_run_from_row(row) for row in self._query(sql, params)]

    def run(self, run_id: str) -> StoredRun | None:
        rows = self._query(f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE id = ?", (run_id,))
        return _run_from_row(rows[0]) if rows else None

    def metrics(self, run_id: str) -> list[MetricRow]:
        rows = self._query(
            "SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY step, name", (run_id,)
        )
        return [MetricRow(*r) for r in rows]

    def evals(self, run_id: str) -> list[EvalRow]:
        rows = self._query(
            "SELECT step, task, metric, value, stderr, status, error FROM evals "
            "WHERE run_id = ? ORDER BY task, metric, step",
            (run_id,),
        )
        return [EvalRow(*r) for r in rows]

    def final_evals(self, run_id: str) -> dict[str, dict[str, EvalRow]]:
        """{task: {metric: row at the latest step}}. A failed latest eval is returned as failed
        even if an earlier step succeeded: an old number must not stand in for a missing one."""
        out: dict[str, dict[str, EvalRow]] = {}
        for row in self.evals(run_id):  # ordered by step, so the last one wins
            out.setdefault(row.task, {})[row.metric] = row
        return out

    def curve(self, run_id: str, task: str, metric: str = "acc") -> list[EvalRow]:
        """One task/metric's rows of a run in step order (an attack's recovery curve)."""
        return [r for r in self.evals(run_id) if r.task == task and r.metric == metric]


def read_tree(root: str | os.PathLike) -> list[RunRecord]:
    """Read and validate every run directory under `root` (hidden and temporary directories
    skipped); UsageError on a bad row or a run id seen twice. Writes nothing."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    records: dict[str, RunRecord] = {}
    for run_file in sorted(root.rglob("run.json")):
        if any(part.startswith(".") for part in run_file.relative_to(root).parts):
            continue  # atomic_dir's temp siblings, old copies being removed
        record = RunDir(run_file.parent).read()
        if record.meta.id in records:
            raise UsageError(f"run id {record.meta.id!r} appears twice under {root}")
        records[record.meta.id] = record
    return list(records.values())


_TABLES = frozenset({"runs", "metrics", "evals"})


def _check_schema(c: sqlite3.Connection, path: Path) -> None:
    """UsageError unless the database is empty (it becomes a store) or a store of this version.

    Only reads. A non-empty database without our tables is someone else's: writing our tables
    into it would mix our rows into their file.
    """
    objects = c.execute("SELECT type, name FROM sqlite_master").fetchall()
    version = c.execute("PRAGMA user_version").fetchone()[0]
    if not objects and version == 0:
        return
    tables = {name for kind, name in objects if kind == "table"}
    if not tables >= _TABLES:
        shown = ", ".join(sorted(tables)) or "none"
        raise UsageError(
            f"{path} is a SQLite database but not a results store (its tables: {shown}); "
            "give another --store"
        )
    if version not in (*MIGRATED, SCHEMA_VERSION):  # older ones are migrated when opened
        raise UsageError(f"{path}: store schema version {version} is not supported")


@contextlib.contextmanager
def _immediate(c: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: the write lock taken up front (BEGIN IMMEDIATE), committed when
    the block ends, rolled back if it raises."""
    c.execute("BEGIN IMMEDIATE")
    try:
        yield
        c.execute("COMMIT")
    except BaseException:
        if c.in_transaction:
            c.execute("ROLLBACK")
        raise


def _migrate(c: sqlite3.Connection) -> None:
    """Bring an older store to SCHEMA_VERSION: SQLite cannot change a CHECK constraint, so the
    runs table is rebuilt with the new kinds and statuses and its rows copied (SQLite's
    documented procedure: foreign keys off, so dropping the old table does not cascade into
    metrics and evals)."""
    if c.execute("PRAGMA user_version").fetchone()[0] not in MIGRATED:
        return
    c.execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction: set before BEGIN
    try:
        with _immediate(c):
            # Not migrated meanwhile by another process:
            if c.execute("PRAGMA user_version").fetchone()[0] in MIGRATED:
                c.execute(_RUNS_TABLE.format(table="runs_new"))
                columns = ", ".join(_RUN_COLUMNS)
                c.execute(f"INSERT INTO runs_new ({columns}) SELECT {columns} FROM runs")
                c.execute("DROP TABLE runs")
                c.execute("ALTER TABLE runs_new RENAME TO runs")
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    finally:
        c.execute("PRAGMA foreign_keys = ON")


def check_store(path: str | os.PathLike) -> Path:
    """Check a --store path before a command writes anything (run dir, weights): a new file
    that can be created, an empty database or a results store. Reads only; creates nothing."""
    path = check_writable_parent(path)
    if path.is_dir():
        raise UsageError(f"results store {path} is a directory, not a SQLite file")
    if not path.exists():
        return path
    try:
        # mode=rw: never create the file here (it may vanish between the check and the open).
        conn = sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as e:
        raise UsageError(f"{path} is not a usable results store: {e}") from None
    try:
        _check_schema(conn, path)
    except sqlite3.DatabaseError as e:
        raise UsageError(f"{path} is not a usable results store: {e}") from None
    finally:
        conn.close()
    return path


def _check_run_exists(c: sqlite3.Connection, run_id: str, path: Path) -> None:
    if c.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
        raise UsageError(f"no run {run_id!r} in {path}")


def _insert_metrics(c: sqlite3.Connection, run_id: str, rows: list[MetricRow], path: Path) -> None:
    _check_run_exists(c, run_id, path)
    c.executemany(
        "INSERT OR REPLACE INTO metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)",
        [(run_id, r.step, r.name, r.value) for r in rows],
    )


def _insert_evals(c: sqlite3.Connection, run_id: str, rows: list[EvalRow], path: Path) -> None:
    _check_run_exists(c, run_id, path)
    c.executemany(
        "INSERT OR REPLACE INTO evals (run_id, step, task, metric, value, stderr, status, error) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(run_id, r.step, r.task, r.metric, r.value, r.stderr, r.status, r.error) for r in rows],
    )


def _upsert(c: sqlite3.Connection, run: RunMeta, run_dir: str | None) -> None:
    values = {f.name: getattr(run, f.name) for f in fields(RunMeta) if f.name != "format"}
    values["config"] = json.dumps(values["config"], sort_keys=True)
    values["final"] = json.dumps(values["final"])
    values["run_dir"] = run_dir
    columns = ", ".join(_RUN_COLUMNS)
    placeholders = ", ".join("?" for _ in _RUN_COLUMNS)
    updates = ", ".join(f"{col} = excluded.{col}" for col in _RUN_COLUMNS if col != "id")
    # ON CONFLICT ... DO UPDATE, not INSERT OR REPLACE: a replace deletes the row first, and the
    # ON DELETE CASCADE would silently drop the run's metrics and evals.
    c.execute(
        f"INSERT INTO runs ({columns}) VALUES ({placeholders}) "
        f"ON CONFLICT (id) DO UPDATE SET {updates}",
        [values[col] for col in _RUN_COLUMNS],
    )


def _enforce_done_has_evals(c: sqlite3.Connection, run_id: str) -> str:
    """Store the status readers must see (`runs.status.effective_status`: a "done" run without
    eval rows is failed); return the status now stored."""
    status = c.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
    has_evals = c.execute("SELECT 1 FROM evals WHERE run_id = ? LIMIT 1", (run_id,)).fetchone()
    effective, error = effective_status(status, has_evals is not None)
    if error is not None:
        c.execute("UPDATE runs SET status = ?, error = ? WHERE id = ?", (effective, error, run_id))
    return effective


def _ingest(c: sqlite3.Connection, record: RunRecord, path: Path) -> str:
    run_id = record.meta.id
    _upsert(c, record.meta, str(record.path.absolute()))
    # The run directory is the truth: drop what the store had for this run, then copy it in.
    c.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
    c.execute("DELETE FROM evals WHERE run_id = ?", (run_id,))
    _insert_metrics(c, run_id, record.metrics, path)
    _insert_evals(c, run_id, record.evals, path)
    return _enforce_done_has_evals(c, run_id)


def _run_from_row(row: tuple) -> StoredRun:
    d = dict(zip(_RUN_COLUMNS, row, strict=True))
    d["config"] = json.loads(d["config"])
    d["final"] = json.loads(d["final"])
    return StoredRun(**d)
