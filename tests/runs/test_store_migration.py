"""A version-1 store (before the probe and robustness run kinds) is migrated in place."""

from __future__ import annotations

import sqlite3

from unlearn.runs.rows import RunMeta
from unlearn.runs.store import SCHEMA_VERSION, Store, check_store

V1_RUNS = """
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('baseline', 'unlearn', 'attack')),
    method TEXT, config TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'diverged',
                                           'collapsed', 'preempted')),
    created TEXT, started TEXT, finished TEXT, job_id TEXT, model_path TEXT, parent TEXT,
    run_dir TEXT, error TEXT, final TEXT NOT NULL DEFAULT '{}'
)"""


def _v1_store(path):
    """A store as version 1 wrote it: its runs table refuses the new kinds."""
    with Store(path) as s:
        s.upsert_run(RunMeta("a1", "attack", status="running"))
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA foreign_keys = OFF")
    c.execute("PRAGMA legacy_alter_table = ON")  # metrics and evals keep referencing "runs"
    c.execute("BEGIN")
    c.execute("ALTER TABLE runs RENAME TO runs_old")
    c.execute(V1_RUNS)
    c.execute("INSERT INTO runs SELECT * FROM runs_old")
    c.execute("DROP TABLE runs_old")
    c.execute(
        "INSERT INTO evals (run_id, step, task, metric, value, status) "
        "VALUES ('a1', 0, 'forget', 'acc', 0.5, 'done')"
    )
    c.execute("PRAGMA user_version = 1")
    c.execute("COMMIT")
    try:
        c.execute("INSERT INTO runs (id, kind, status) VALUES ('p', 'probe', 'done')")
        raise AssertionError("the version-1 table should refuse a probe run")
    except sqlite3.IntegrityError:
        pass
    c.close()


def test_version_1_store_is_migrated_with_its_rows(tmp_path):
    path = tmp_path / "store.sqlite"
    _v1_store(path)
    check_store(path)  # a version-1 store is accepted (and migrated when opened)
    with Store(path) as s:
        assert [(r.id, r.kind) for r in s.runs()] == [("a1", "attack")]
        assert [(e.task, e.value) for e in s.evals("a1")] == [("forget", 0.5)]
        s.upsert_run(RunMeta("p1", "probe", status="running"))
        s.upsert_run(RunMeta("r1", "robustness", status="running"))
        assert sorted(r.kind for r in s.runs()) == ["attack", "probe", "robustness"]
    c = sqlite3.connect(path)
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert c.execute("PRAGMA foreign_key_check").fetchall() == []
    c.close()
    with Store(path) as s:  # opening again is a no-op
        assert len(s.runs()) == 3
