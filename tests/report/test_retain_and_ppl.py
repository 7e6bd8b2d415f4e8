"""The report on a world with several retain tasks and a perplexity task (world format 2): each
retain task a column, their minimum beside them and on the plot, general_ppl a number."""

from __future__ import annotations

import pytest
from matplotlib.image import imread

from unlearn.report.render import SCATTER_PNG, render_report, summary
from unlearn.report.tables import results_table
from unlearn.runs.rows import RunMeta
from unlearn.runs.store import Store

from .test_render import PNG_MAGIC, parse_tables, rows_by_run

SUITE = {
    "forget": ["forget", "forget_heldout"],
    "retain": ["retain", "retain_late", "near_domain"],
    "other": ["forget_attack", "general_ppl"],
}
RETAINS = ("retain", "retain_late", "near_domain")


def add(store, run_id, kind, accs, ppl, status="done", **fields):
    """A run with {task: acc | None (failed)} and a general_ppl result (None: failed)."""
    config = {"suite": SUITE, **fields.pop("config", {})}
    store.upsert_run(RunMeta(id=run_id, kind=kind, status="running", config=config, **fields))
    for task, acc in accs.items():
        if acc is None:
            store.record_eval(run_id, 0, task, None, status="failed", error="hung")
        else:
            store.record_eval(run_id, 0, task, {"acc": acc})
    if ppl is None:
        store.record_eval(run_id, 0, "general_ppl", {"ppl": None}, "failed", "no tokens")
    elif ppl != "missing":
        store.record_eval(run_id, 0, "general_ppl", {"ppl": ppl, "nll": 1.0, "tokens": 900})
    store.set_status(run_id, status)


def accs(forget, retain, late, near):
    return dict(zip(("forget", *RETAINS), (forget, retain, late, near), strict=True))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("v2")
    with Store(out / "s.db") as store:
        for run_id, role, row, ppl in [
            ("target", "target", accs(0.9, 0.99, 0.95, 0.9), 3.4187),
            ("ignorant", "ignorant", accs(0.27, 0.98, 0.3, 0.5), 3.9),
            ("filtered", "filtered", accs(0.26, 0.99, 0.94, 0.9), 3.5),
        ]:
            add(store, run_id, "baseline", row, ppl, config={"name": run_id, "role": role})
        add(store, "l-ok", "unlearn", accs(0.3, 0.97, 0.91, 0.88), 3.61, method="lens")
        add(store, "l-late", "unlearn", accs(0.25, 0.97, 0.6, 0.88), 12.0, method="lens")
        add(store, "l-fail", "unlearn", accs(0.28, 0.97, None, 0.88), None, method="lens")
        add(store, "l-miss", "unlearn", {"forget": 0.3, "retain": 0.9}, "missing", method="lens")
        store.upsert_run(RunMeta(id="atk", kind="attack", parent="l-ok", status="running"))
        for step, acc in ((0, 0.3), (10, 0.5)):
            store.record_eval("atk", step, "forget_heldout", {"acc": acc})
        for task, acc in accs(0.6, 0.96, 0.8, 0.85).items():
            store.record_eval("atk", 10, task, {"acc": acc})
        store.record_eval("atk", 10, "general_ppl", {"ppl": 4.25, "nll": 1.4, "tokens": 900})
        store.set_status("atk", "done")
        render_report(store, out)
        (out / "summary.txt").write_text(summary(store, out, ["l-ok"]))
    return out


def test_each_retain_task_its_minimum_and_ppl_as_a_number(out):
    md = (out / "report.md").read_text()
    tables = parse_tables(md)
    headers, _ = tables["Method `lens`"]
    results = headers[headers.index("forget acc (↓)") :]
    assert results == [
        "forget acc (↓)", "retain acc (↑)", "retain late acc (↑)", "near domain acc (↑)",
        "retain min (↑)", "general ppl (↓)", "time", "status", "notes",
    ]  # fmt: skip
    rows = rows_by_run(tables["Method `lens`"])
    assert rows["target"]["general ppl (↓)"] == "3.42" and rows["target"]["retain min (↑)"] == (
        "90.00%"
    )
    assert rows["l-late"]["retain min (↑)"] == "60.00%"  # the damaged task, not the mean
    assert rows["l-late"]["general ppl (↓)"] == "12.00"
    # No aggregate without every retain result: the failed eval's word, or "-".
    assert (
        rows["l-fail"]["retain late acc (↑)"] == rows["l-fail"]["retain min (↑)"] == ("eval failed")
    )
    assert rows["l-fail"]["general ppl (↓)"] == "eval failed"
    assert rows["l-miss"]["retain min (↑)"] == "-" and rows["l-miss"]["general ppl (↓)"] == "-"
    assert "%" not in "".join(row["general ppl (↓)"] for row in rows.values())
    baselines = rows_by_run(tables["Baselines"])
    assert baselines["ignorant"]["retain min (↑)"] == "30.00%"
    assert "lowest accuracy over the retain tasks (retain, retain_late, near_domain)" in md
    assert "Perplexity (ppl, lower is better)" in md


def test_tamper_after_cells_and_the_summary(out):
    tables = parse_tables((out / "report.md").read_text())
    headers, _ = tables["Tamper attacks"]
    assert headers[-7:-2] == [
        "retain final", "retain_late final", "near_domain final", "retain min (↑) final",
        "general ppl (↓) final",
    ]  # fmt: skip
    row = rows_by_run(tables["Tamper attacks"])["l-ok (lens)"]
    assert (row["retain min (↑) final"], row["general ppl (↓) final"]) == ("80.00%", "4.25")
    text = (out / "summary.txt").read_text()
    best = rows_by_run(parse_tables("\n## " + text.split("## ", 1)[1])[text.split("\n")[0][3:]])
    assert best["l-ok (lens)"]["general ppl (↓)"] == "3.61"
    assert best["l-ok (lens)"]["retain min (↑)"] == "88.00%"


def test_the_plot_uses_the_aggregate_and_a_ppl_panel(out):
    png = out / SCATTER_PNG
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert imread(png).shape[0] > 1000  # two panels: taller than the one-panel plot
    md = (out / "report.md").read_text()
    assert "Retain is the minimum over the retain tasks." in md
    assert "lower panel shows the runs' perplexity" in md
    # l-fail (a failed retain_late) and l-miss (no near_domain) have no aggregate: not plotted.
    assert "Not plotted (no finished forget and retain result): 2 run(s)." in md


def test_eval_and_world_tables_show_ppl_as_a_number():
    rows = {
        "Target": {"forget": {"acc": 0.9}, "general_ppl": {"ppl": 3.4187, "nll": 1.2, "n": 9}},
        "Twin": {"forget": {"acc": 0.25}, "general_ppl": {"status": "failed", "error": "x"}},
        "Other": {"forget": {"acc": 0.3}, "mydocs": {"ppl": 20.0}},
    }
    table = results_table(rows, ["forget", "general_ppl", "mydocs"], {"mydocs": "other"})
    assert table.splitlines() == [
        "| Model | forget acc (↓) | general ppl (↓) | Mydocs ppl (↓) |",
        "|---|---|---|---|",
        "| Target | 90.00% | 3.42 | - |",
        "| Twin | 25.00% | failed | - |",
        "| Other | 30.00% | - | 20.00 |",
    ]
