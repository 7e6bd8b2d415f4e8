"""Older stores are migrated in place: version 1 (before the probe and robustness run kinds) and
version 2 (before the status pruned)."""

from __future__ import annotations

import sqlite3

import pytest

from unlearn.runs.rows import RunMeta
from unlearn.runs.store import SCHEMA_VERSION, Store, check_store

OLD_RUNS = """
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ({kinds})),
    method TEXT, config TEXT NOT NULL DEFAULT '{{}}',
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'diverged',
                                           'collapsed', 'preempted')),
    created TEXT, started TEXT, finished TEXT, job_id TEXT, model_path TEXT, parent TEXT,
    run_dir TEXT, error TEXT, final TEXT NOT NULL DEFAULT '{{}}'
)"""


OLD_KINDS = {
    1: "'baseline', 'unlearn', 'attack'",
    2: "'baseline', 'unlearn', 'attack', 'probe', 'robustness'",
}


def _old_store(path, version):
    """A store as an older version wrote it: its runs table refuses the new kinds/statuses."""
    with Store(path) as s:
        s.upsert_run(RunMeta("a1", "attack", status="running"))
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA foreign_keys = OFF")
    c.execute("PRAGMA legacy_alter_table = ON")  # metrics and evals keep referencing "runs"
    c.execute("BEGIN")
    c.execute("ALTER TABLE runs RENAME TO runs_old")
    c.execute(OLD_RUNS.format(kinds=OLD_KINDS[version]))
    c.execute("INSERT INTO runs SELECT * FROM runs_old")
    c.execute("DROP TABLE runs_old")
    c.execute(
        "INSERT INTO evals (run_id, step, task, metric, value, status) "
        "VALUES ('a1', 0, 'forget', 'acc', 0.5, 'done')"
    )
    c.execute(f"PRAGMA user_version = {version}")
    c.execute("COMMIT")
    with pytest.raises(sqlite3.IntegrityError):  # the old table refuses a pruned run
        c.execute("INSERT INTO runs (id, kind, status) VALUES ('p', 'unlearn', 'pruned')")
    c.close()


@pytest.mark.parametrize("version", [1, 2])
def test_old_store_is_migrated_with_its_rows(tmp_path, version):
    path = tmp_path / "store.sqlite"
    _old_store(path, version)
    check_store(path)  # an older store is accepted (and migrated when opened)
    with Store(path) as s:
        assert [(r.id, r.kind) for r in s.runs()] == [("a1", "attack")]
        assert [(e.task, e.value) for e in s.evals("a1")] == [("forget", 0.5)]
        s.upsert_run(RunMeta("p1", "probe", status="running"))
        s.upsert_run(RunMeta("r1", "robustness", status="running"))
        s.upsert_run(RunMeta("u1", "unlearn", "rmu", status="pruned"))
        assert sorted(r.kind for r in s.runs()) == ["attack", "probe", "robustness", "unlearn"]
    c = sqlite3.connect(path)
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert c.execute("PRAGMA foreign_key_check").fetchall() == []
    c.close()
    with Store(path) as s:  # opening again is a no-op
        assert len(s.runs()) == 4
