"""The markdown/PNG report from a store: status words instead of numbers, column choice, tamper
table, plots, and the `unlearn report` command (the pure parts: test_tables, test_analysis)."""

from __future__ import annotations

import json
import re

import pytest
from matplotlib.image import imread

from unlearn.commands.report import main as report_main
from unlearn.errors import UsageError
from unlearn.report.render import SCATTER_PNG, TAMPER_PNG, render_report
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RunDir
from unlearn.runs.store import Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUMBER = re.compile(r"\d+\.\d+%?")
ATTACK_STEPS = [0, 10, 20, 50, 100]


def add(store, run_id, kind, evals=None, status="done", **fields):
    """Add a run with {task: acc | None (failed eval)} results at step 0, then set its status."""
    store.upsert_run(RunMeta(id=run_id, kind=kind, status="running", **fields))
    for task, acc in (evals or {}).items():
        if acc is None:
            store.record_eval(run_id, 0, task, None, status="failed", error="lm-eval hung")
        else:
            store.record_eval(run_id, 0, task, {"acc": acc})
    store.set_status(run_id, status, error=fields.get("error"))


def add_attack(store, run_id, parent, accs, status="done", failed_step=None):
    store.upsert_run(RunMeta(id=run_id, kind="attack", parent=parent, status="running"))
    for step, acc in zip(ATTACK_STEPS, accs, strict=True):
        if step == failed_step:
            store.record_eval(run_id, step, "forget_heldout", None, "failed", "timeout")
        else:
            store.record_eval(run_id, step, "forget_heldout", {"acc": acc})
        store.record_eval(run_id, step, "forget", {"acc": acc + 0.01})
    store.record_eval(run_id, ATTACK_STEPS[-1], "retain", {"acc": 0.9})
    store.set_status(run_id, status)


def lens(retain_coef, **extra):
    return {
        "retain_coef": retain_coef,
        "remove_coef": 5.0,
        "lr": 0.001,
        "steps": 32,
        "output": f"runs/lens-{retain_coef}",
        **extra,
    }


def build_store(path):
    store = Store(path)
    tasks = ("forget", "forget_heldout", "retain")
    for run_id, name, role, accs in [
        ("target", "Target (to unlearn)", "target", (0.81, 0.80, 0.95)),
        ("ignorant", "Ignorant checkpoint", "ignorant", (0.27, 0.26, 0.70)),
        ("filtered", "Filtered twin", "filtered", (0.24, 0.25, 0.93)),
    ]:
        add(
            store,
            run_id,
            "baseline",
            dict(zip(tasks, accs, strict=True)),
            config={"name": name, "role": role},
        )
    loss = {"retain": 1.19, "forget": 1.04}
    add(
        store,
        "l-good",
        "unlearn",
        {"forget": 0.3012, "forget_heldout": 0.31, "retain": 0.90},
        method="lens",
        config=lens(5.0),
        final=loss,
        job_id="2088655",
        started="2026-01-05T10:00:00+00:00",
        finished="2026-01-05T10:06:24+00:00",
    )
    add(
        store,
        "l-low",
        "unlearn",
        {"forget": 0.24, "retain": 0.60},
        method="lens",
        config=lens(1.0),
        final=loss,
        started="2026-01-05T10:00:00+00:00",
        finished="2026-01-05T10:01:35+00:00",
    )
    add(
        store,
        "l-high",
        "unlearn",
        {"forget": 0.50, "retain": 0.94},
        method="lens",
        config=lens(10.0),
        final=loss,
    )
    add(
        store,
        "l-oom",
        "unlearn",
        status="failed",
        method="lens",
        config=lens(2.0),
        final=loss,
        error="CUDA out of memory",
    )
    add(
        store,
        "l-div",
        "unlearn",
        status="diverged",
        method="lens",
        config=lens(50.0),
        final={"retain": float("nan"), "forget": 3.2},
    )
    add(store, "l-pend", "unlearn", status="pending", method="lens", config=lens(3.0))
    add(store, "l-run", "unlearn", status="running", method="lens", config=lens(4.0))
    add(
        store,
        "l-coll",
        "unlearn",
        {"forget": 0.25, "retain": 0.25},
        status="collapsed",
        method="lens",
        config=lens(400.0),
        final=loss,
    )
    add(
        store,
        "l-evfail",
        "unlearn",
        {"forget": 0.35, "retain": None},
        method="lens",
        config=lens(7.0),
        final=loss,
    )
    for i, r in enumerate((8, 16)):
        add(
            store,
            f"ct-{r}",
            "unlearn",
            {"forget": 0.4 - 0.05 * i, "retain": 0.8 + 0.02 * i},
            method="checkpoint_transfer",
            config={"lora": {"r": r}, "retain_coef": 2.0},
            final={"retain_kl": 0.02, "cb": 0.89},
        )
    add_attack(store, "atk-good", "l-good", [0.30, 0.50, 0.60, 0.70, 0.75])
    add_attack(store, "atk-filtered", "filtered", [0.25, 0.26, 0.25, 0.27, 0.26])
    add_attack(store, "atk-failed", "l-high", [0.5, 0.6, 0.7, 0.7, 0.7], status="failed")
    add_attack(store, "atk-hole", "l-low", [0.24, 0.3, 0.0, 0.5, 0.6], failed_step=20)
    return store


def parse_tables(md):
    """{section heading: (headers, rows)} for each section holding a table."""
    out = {}
    for section in md.split("\n## ")[1:]:
        lines = [ln for ln in section.splitlines() if ln.startswith("|")]
        if lines:
            split = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
            out[section.splitlines()[0]] = (split[0], split[2:])
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    with build_store(out / "results.db") as store:
        path = render_report(store, out)
    return path, path.read_text(), parse_tables(path.read_text())


def rows_by_run(table):
    headers, rows = table
    return {row[0]: dict(zip(headers, row, strict=True)) for row in rows}


def test_status_words_replace_numbers(report):
    _, _, tables = report
    rows = rows_by_run(tables["Method `lens`"])
    result_columns = ["retain loss", "forget loss", "forget acc (↓)", "retain acc (↑)"]
    for run_id, word in [
        ("l-oom", "failed"),
        ("l-div", "diverged"),
        ("l-pend", "pending"),
        ("l-run", "running"),
        ("l-coll", "collapsed"),
    ]:
        row = rows[run_id]
        assert [row[c] for c in result_columns] == [word] * 4, run_id
        assert row["status"] == word
        assert not any(NUMBER.search(row[c]) for c in result_columns)
    assert rows["l-oom"]["notes"] == "CUDA out of memory"
    assert rows["l-evfail"]["retain acc (↑)"] == "eval failed"
    assert rows["l-evfail"]["forget acc (↓)"] == "35.00%"
    assert rows["l-evfail"]["notes"] == "retain: lm-eval hung"
    good = rows["l-good"]
    assert (good["forget acc (↓)"], good["forget heldout acc (↓)"], good["retain acc (↑)"]) == (
        "30.12%",
        "31.00%",
        "90.00%",
    )
    assert (good["retain loss"], good["forget loss"], good["job"]) == ("1.19", "1.04", "2088655")
    assert rows["l-low"]["forget heldout acc (↓)"] == "-"  # never measured: not a number either


def test_time_column_is_each_runs_wall_time(report):
    _, md, tables = report
    rows = rows_by_run(tables["Method `lens`"])
    assert rows["l-good"]["time"] == "6.4 min"  # 384 s from run.json's started to finished
    assert rows["l-low"]["time"] == "95 s"
    assert rows["l-run"]["time"] == "-"  # not finished: no end yet
    assert rows["Target (to unlearn)"]["time"] == "-"  # a reference model is not trained here
    assert "time is an unlearning run's wall time" in md


def test_baselines_first_and_only_varying_columns(report):
    _, md, tables = report
    headers, rows = tables["Method `lens`"]
    assert [r[0] for r in rows[:3]] == [
        "Target (to unlearn)",
        "Ignorant checkpoint",
        "Filtered twin",
    ]
    assert rows[0][headers.index("forget acc (↓)")] == "81.00%"
    assert headers[:3] == ["run", "job", "retain_coef"]
    for fixed in ("lr", "steps", "remove_coef", "output"):
        assert fixed not in headers
    assert "`remove_coef=5`" in md and "`lr=0.001`" in md and "runs/lens" not in md
    ct_headers, ct_rows = tables["Method `checkpoint_transfer`"]
    assert ct_headers[1:4] == ["r", "retain_kl loss", "cb loss"]  # lora.r varies, retain_coef not
    assert [r[1] for r in ct_rows[3:]] == ["8", "16"]


def test_tamper_table(report):
    _, md, tables = report
    headers, _ = tables["Tamper attacks"]
    rows = rows_by_run(tables["Tamper attacks"])
    assert headers[:8] == [
        "attacked model",
        "attack run",
        "step 0",
        "step 20",
        "final",
        "recovery",
        "steps to half recovery",
        "AUC",
    ]
    good = rows["l-good (lens)"]
    assert [good[h] for h in headers[2:8]] == [
        "30.00%",
        "60.00%",
        "75.00%",
        "+45.00 pts",
        "20",
        "65.25%",
    ]
    assert good["forget final"] == "76.00%" and good["retain final"] == "90.00%"
    filtered = rows["Filtered twin"]
    assert filtered["steps to half recovery"] == "never"
    failed = rows["l-high (lens)"]
    assert [failed[h] for h in headers[2:]] == ["failed"] * (len(headers) - 4) + ["failed", ""]
    hole = rows["l-low (lens)"]
    assert hole["step 20"] == "eval failed" and hole["step 0"] == "24.00%"
    assert [hole[h] for h in ("recovery", "steps to half recovery", "AUC")] == ["eval failed"] * 3
    assert "original target (80.00%)" in md
    # Baselines' attacks first, then unlearned runs' by id, whatever order they finished in
    # (atk-good was stored first).
    assert [row[0] for row in tables["Tamper attacks"][1]] == [
        "Filtered twin",
        "l-good (lens)",
        "l-high (lens)",
        "l-low (lens)",
    ]


def test_pngs_are_valid(report):
    path, md, _ = report
    for name in (SCATTER_PNG, TAMPER_PNG):
        png = path.parent / name
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert imread(png).shape[0] > 300
        assert f"]({name})" in md
    assert "Not plotted (no finished forget and retain result): 6 run(s)." in md


def test_empty_and_all_failed_stores_render(tmp_path):
    with Store(tmp_path / "empty.db") as store:
        md = render_report(store, tmp_path / "empty").read_text()
    assert "No unlearning runs yet" in md and "No tamper attacks" in md
    assert "No baseline models evaluated" in md
    assert not (tmp_path / "empty" / SCATTER_PNG).exists()
    with Store(tmp_path / "failed.db") as store:
        add(store, "x", "unlearn", status="failed", method="lens", config=lens(1.0), error="boom")
        add(store, "y", "unlearn", status="failed", method="lens", config=lens(2.0))
        md = render_report(store, tmp_path / "failed").read_text()
    rows = rows_by_run(parse_tables(md)["Method `lens`"])
    assert rows["x"]["status"] == "failed" and rows["x"]["notes"] == "boom"
    assert (tmp_path / "failed" / SCATTER_PNG).read_bytes()[:8] == PNG_MAGIC


def test_report_command(tmp_path, capsys):
    with pytest.raises(UsageError, match="does not exist"):
        report_main(["--store", str(tmp_path / "missing.db"), "--out", str(tmp_path / "r")])
    build_store(tmp_path / "results.db").close()
    assert report_main(["--store", str(tmp_path / "results.db"), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "r" / "report.md")


def test_report_command_ingests_run_dirs(tmp_path, capsys):
    rd = RunDir(tmp_path / "runs" / "u1")
    rd.write_run(RunMeta(id="u1", kind="unlearn", method="lens", status="running"))
    rd.append_eval(32, "forget", {"acc": 0.2984})
    rd.append_eval(32, "retain", {"acc": 0.3361})
    rd.update(status="done")
    store, out = tmp_path / "new.db", tmp_path / "r"
    assert (
        report_main(["--store", str(store), "--ingest", str(tmp_path / "runs"), "--out", str(out)])
        == 0
    )
    rows = rows_by_run(parse_tables((out / "report.md").read_text())["Method `lens`"])
    assert (rows["u1"]["forget acc (↓)"], rows["u1"]["retain acc (↑)"]) == ("29.84%", "33.61%")


def test_report_ingest_rejects_a_non_numeric_eval_value(tmp_path):
    rd = RunDir(tmp_path / "runs" / "u1")
    rd.write_run(RunMeta(id="u1", kind="unlearn", method="lens", status="done"))
    rd.append_eval(32, "retain", {"acc": 0.3361})
    row = {"step": 32, "task": "forget", "metric": "acc", "value": "0.29 (hand-edited)",
           "stderr": None, "status": "done", "error": None}  # fmt: skip
    with open(rd.evals_file, "a") as f:
        f.write(json.dumps(row) + "\n")
    store, out = tmp_path / "new.db", tmp_path / "r"
    argv = ["--store", str(store), "--ingest", str(tmp_path / "runs"), "--out", str(out)]
    with pytest.raises(UsageError, match=r"evals.jsonl:2: .*must be a finite number") as e:
        report_main(argv)
    assert "\n" not in str(e.value)
    # Rejected at ingest: nothing was stored (not even an empty store) and no report written.
    assert not store.exists() and not out.exists()


def test_a_campaign_without_a_world(tmp_path):
    """Runs whose suite's only retain task is a question file (`science`) and a robustness run
    (its "suite" a robustness suite's name): the run's retain is `science` in the table and the
    plot (no world `retain` task joins from the robustness run), and an attack given the
    model's path as it was typed is labelled by the run whose model it attacked."""
    suite = {"forget": ["heldout"], "retain": ["science"], "other": []}
    with Store(tmp_path / "results.db") as store:
        add(store, "run1", "unlearn", {"heldout": 0.25, "science": 0.9}, method="grad_diff",
            config={"suite": suite}, model_path="/home/u/c/run1/model")  # fmt: skip
        add(store, "run2", "unlearn", {"heldout": 0.5, "science": 0.8}, method="grad_diff",
            config={"suite": suite, "lr": 2e-4},
            model_path="/home/u/c/other/run1/model")  # fmt: skip
        store.upsert_run(RunMeta(id="atk1", kind="attack", parent="c/run1/model",
                                 config={"suite": suite}, status="running"))  # fmt: skip
        for step, acc in [(0, 0.25), (1, 0.5)]:
            store.record_eval("atk1", step, "heldout", {"acc": acc})
            store.record_eval("atk1", step, "science", {"acc": 0.75})
        store.set_status("atk1", "done")
        add(store, "rb1", "robustness", config={"suite": "quick", "heldout_task": "heldout"},
            model_path="/home/u/c/run1/model")  # fmt: skip
        store.record_eval("rb1", 0, "heldout", {"worst_case": 0.5})
        path = render_report(store, tmp_path / "report")
    md = path.read_text()
    tables = parse_tables(md)
    headers, rows = tables["Method `grad_diff`"]
    assert headers[-4:] == ["Heldout (↓)", "Science (↑)", "time", "status"]
    assert [r[-4:] for r in rows] == [
        ["25.00%", "90.00%", "-", "done"],
        ["50.00%", "80.00%", "-", "done"],
    ]
    assert "retain min" not in md and "Not plotted" not in md
    headers, rows = tables["Tamper attacks"]
    assert rows == [["run1 (grad_diff)", "atk1", "25.00%", "50.00%", "+25.00 pts", "-",
                     "37.50%", "75.00%", "done", ""]]  # fmt: skip
    assert headers[-3] == "Science (↑) final"


def test_an_attack_is_named_by_the_one_run_whose_model_it_attacked(tmp_path):
    from unlearn.report.data import model_owner
    from unlearn.runs.store import StoredRun

    paths = [("a", "/x/a/model"), ("b", "/y/b/model"), ("b2", "/z/b/model")]
    runs = [StoredRun(id=i, kind="unlearn", method="m", status="done", model_path=p)
            for i, p in paths]  # fmt: skip
    assert model_owner("a/model", runs).id == "a"
    assert model_owner("/x/a/model", runs).id == "a" and model_owner("./a//model", runs).id == "a"
    assert model_owner("/w/a/model", runs) is None  # an absolute path must match exactly
    assert model_owner("b/model", runs) is None  # two runs: no name rather than a wrong one
    assert model_owner("y/b/model", runs).id == "b"
    assert model_owner("model", runs) is None
