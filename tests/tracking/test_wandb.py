"""Weights & Biases in its own offline mode (WANDB_MODE=offline, no network): a run's W&B run
read back from its local files (the offline run directory's .wandb records)."""

from __future__ import annotations

import pytest

from unlearn.cli import main as cli
from unlearn.runs.rundir import RunDir

from .helpers import run_argv, tracking_free, wandb_items, wandb_records


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, its settings and caches under tmp_path (nothing read from or written to
    the home directory), quiet."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS"):
        monkeypatch.delenv(name, raising=False)


def test_offline_wandb_run_holds_curves_results_and_config(tiny_world, tmp_path, wandb_offline):
    out = tmp_path / "run"
    flags = ["--report_to", "wandb", "--project", "unlearning", "--group", "tiny",
             "--run_name", "seq-1", "--tags", "a", "b"]  # fmt: skip
    assert cli(run_argv(tiny_world, out, *flags)) == 0
    record = RunDir(out).read()
    records = wandb_records(out)  # OUT/wandb/offline-run-*: the run's own directory
    by_kind: dict[str, list] = {}
    for r in records:
        by_kind.setdefault(r.WhichOneof("record_type"), []).append(r)

    (run,) = by_kind["run"]
    assert (run.run.project, run.run.display_name, run.run.run_group) == ("unlearning", "seq-1",
                                                                          "tiny")  # fmt: skip
    assert list(run.run.tags) == ["a", "b"] and run.run.job_type == "unlearn"
    config = wandb_items(run.run.config.update)
    assert config["method"] == "sequential" and config["max_steps"] == 2
    assert tracking_free(config) and tracking_free(record.meta.config)

    history: dict[int, dict] = {}
    for r in by_kind["history"]:
        row = wandb_items(r.history.item)
        history.setdefault(row["_step"], {}).update(row)
    assert sorted(history) == [1, 2]
    for m in record.metrics:  # every loss term, coefficient, lr and grad norm at its step
        assert history[m.step][f"train/{m.name}"] == pytest.approx(m.value)
    assert all(history[s]["train/tokens_per_s"] > 0 for s in (1, 2))
    for e in record.evals:
        if e.value is not None:
            assert history[e.step][f"eval/{e.task}/{e.metric}"] == pytest.approx(e.value)

    summary: dict = {}
    for r in by_kind["summary"]:
        summary.update(wandb_items(r.summary.update))
    assert summary["status"] == "done"
    final = {(e.task, e.metric): e.value for e in record.evals if e.value is not None}
    for (task, metric), value in final.items():
        assert summary[f"final/eval/{task}/{metric}"] == pytest.approx(value)
    for term, value in record.meta.final.items():
        assert summary[f"final/train/{term}"] == pytest.approx(value)
    (end,) = by_kind["exit"]
    assert end.exit.exit_code == 0
