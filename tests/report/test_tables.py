"""The one result-cell rule (a missing or failed result is a word, never a number), markdown
tables and the choice of hyperparameter columns."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

import unlearn.report as report
from unlearn.report import analysis, render, tables
from unlearn.report.tables import (
    EVAL_FAILED,
    MISSING,
    format_seconds,
    markdown_table,
    pct,
    result_cell,
    results_table,
    split_config_keys,
)
from unlearn.runs.rows import EvalRow

NUMBER = re.compile(r"\d")


def done_row(value: float) -> EvalRow:
    return EvalRow(step=0, task="forget", metric="acc", value=value)


FAILED_ROW = EvalRow(step=0, task="forget", metric="acc", value=None, status="failed", error="hung")


def test_a_done_result_is_a_percentage():
    assert pct(0.30125) == "30.12%" and pct(1.0) == "100.00%"
    assert result_cell(done_row(0.3012)) == "30.12%"
    assert result_cell({"acc": 0.5, "n": 48}) == "50.00%"
    assert result_cell({"acc_norm": 0.25, "acc": 0.5}, metric="acc_norm") == "25.00%"
    assert result_cell(0.9) == "90.00%"
    assert result_cell(0.3125, fmt="{:.3f}".format) == "0.312"  # a table may format its own way


def test_a_failed_result_is_a_word():
    assert result_cell(FAILED_ROW) == EVAL_FAILED == "eval failed"
    assert result_cell({"status": "failed", "error": "timeout", "acc": 0.25}) == EVAL_FAILED
    assert result_cell({"status": "failed"}, failed="failed") == "failed"


def test_wall_times_read_in_seconds_then_minutes():
    assert format_seconds(None) == MISSING
    assert [format_seconds(s) for s in (0.4, 95, 119.4, 120, 384, 3600)] == [
        "0 s", "95 s", "119 s", "2.0 min", "6.4 min", "60.0 min",
    ]  # fmt: skip


@pytest.mark.parametrize("missing", [None, {}, {"n": 48}, {"acc": None}])
def test_a_missing_result_is_a_dash(missing):
    assert result_cell(missing) == MISSING == "-"
    assert pct(None) == "-"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_result_is_never_a_number(bad):
    # A harness that reports NaN has not measured anything; "nan%" must not reach a table.
    for result in (bad, {"acc": bad}):
        assert result_cell(result) == EVAL_FAILED
        assert not NUMBER.search(result_cell(result, failed="failed"))


def test_an_unfinished_run_shows_its_status_word_even_over_a_number():
    for status in ("pending", "running", "failed", "diverged", "collapsed", "preempted"):
        for result in (done_row(0.3), {"acc": 0.3}, 0.3, None, FAILED_ROW):
            assert result_cell(result, run_status=status) == status
    assert result_cell(done_row(0.3), run_status="done") == "30.00%"


def test_a_word_stays_a_word():
    assert result_cell("failed") == "failed" and result_cell("stale") == "stale"
    with pytest.raises(TypeError):
        result_cell([0.3])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        result_cell(True)  # type: ignore[arg-type]


def test_results_table_uses_the_rule():
    rows = {
        "a": {
            "forget": {"acc": 0.3, "collapse": {"collapsed": True}},
            "retain": {"status": "failed"},
        },
        "b": {"forget": {"acc": math.nan}, "retain": {"acc": None}},
        "c": {},
    }
    assert results_table(rows, ["forget", "retain", "zzz"]).splitlines() == [
        "| Model | forget acc (↓) | retain acc (↑) | Zzz |",
        "|---|---|---|---|",
        "| a | 30.00% (collapsed) | failed | - |",
        "| b | failed | - | - |",
        "| c | - | - | - |",
    ]


def test_markdown_table_escapes_cells():
    assert markdown_table(["a", "b"], [["x|y", "two\n lines"]]).splitlines() == [
        "| a | b |",
        "|---|---|",
        "| x\\|y | two lines |",
    ]


def test_split_config_keys_orders_preferred_first():
    varying, fixed = split_config_keys(
        [
            {"zeta": 1, "steps": 32, "lr": 1e-3, "retain_coef": 1, "name": "a", "opt": {"b": 1}},
            {"zeta": 2, "steps": 64, "lr": 1e-4, "retain_coef": 1, "name": "b", "opt": {"b": 1}},
            {"zeta": 2, "steps": 64, "lr": 1e-4, "retain_coef": 1, "lora": {"r": 8}},
        ]
    )
    assert varying == ["lr", "steps", "lora.r", "opt.b", "zeta"]
    assert fixed == {"retain_coef": 1}


def test_tables_import_nothing_heavy():
    # Tables are read by light commands (report, world): importing them must not pull in the
    # evaluator, torch or matplotlib (plots import it when they draw), and must not form a cycle.
    code = (
        "import sys, unlearn.report.tables; "
        "print(sorted(m for m in ('torch', 'matplotlib', 'unlearn.eval.native', "
        "'unlearn.eval.harness') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_report_package_reexports_its_public_names():
    assert report.render_report is render.render_report
    assert report.tamper_summary is analysis.tamper_summary
    assert report.pareto_front is analysis.pareto_front
    assert report.result_cell is tables.result_cell
    assert (report.SCATTER_PNG, report.TAMPER_PNG) == ("forget_vs_retain.png", "tamper_curves.png")
