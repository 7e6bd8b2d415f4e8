"""Printing sweeps: the --dry-run listing, the --status table and its result cells."""

from __future__ import annotations

from unlearn import cli
from unlearn.sweep import execute
from unlearn.sweep.spec import load_sweep
from unlearn.sweep.state import PointState
from unlearn.sweep.table import count_statuses, format_table, state_line

from .helpers import base_spec, fake_run, write_spec


def test_cli_dry_run_and_status(tiny_world, tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path, base_spec(tiny_world))
    ids = [p.id for p in load_sweep(spec).points]
    assert cli.main(["sweep", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids) and "retain_coef=1.0" in out
    assert not (tmp_path / "s").exists()

    monkeypatch.setattr(execute, "run_unlearning", fake_run([], fail=(5.0,)))
    assert cli.main(["sweep", str(spec)]) == 1  # a point failed
    capsys.readouterr()
    assert cli.main(["sweep", str(spec), "--status"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "| done " in rows[ids[0]] and "0.250" in rows[ids[0]]
    assert "| failed " in rows[ids[1]]
    assert "1 done, 1 failed" in out


def test_every_result_cell_follows_the_one_rule():
    """A missing or failed result is a word, never a number (unlearn.report.tables.result_cell),
    in the table and in the progress lines alike."""
    states = [
        PointState(
            "a", "done", attack="done", forget=0.3125, retain=float("nan"), attacked_forget="failed"
        ),
        PointState("b", "done", attack="running", forget="failed", retain=None),
    ]
    rows = [line.split("|")[1:-1] for line in format_table(states).splitlines()[2:]]
    cells = [[c.strip() for c in row] for row in rows]
    assert cells[0] == ["a", "done", "0.312", "eval failed", "done", "failed"]
    assert cells[1] == ["b", "done", "failed", "-", "running", "running"]
    assert "nan" not in format_table(states).lower()
    assert state_line(states[0]) == (
        "a: done  forget 0.312  retain eval failed  attack done (forget after failed)"
    )
    assert count_statuses([*states, PointState("c", "pending")]) == "2 done, 1 pending"


def test_several_retain_tasks_show_their_minimum_and_each():
    retains = {"retain": 0.95, "retain_late": 0.612, "near_domain": "failed"}
    states = [
        PointState("a", "done", forget=0.3, retain=0.612, retains={**retains, "near_domain": 0.9}),
        PointState("b", "done", forget=0.25, retain="failed", retains=retains),
        PointState("c", "pending"),
    ]
    lines = format_table(states).splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert header == [
        "point", "status", "forget acc", "retain (min)", "retain", "retain_late", "near_domain"
    ]  # fmt: skip
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]
    assert cells[0][3:] == ["0.612", "0.950", "0.612", "0.900"]
    assert cells[1][3:] == ["failed", "0.950", "0.612", "failed"]
    assert cells[2][3:] == ["-", "-", "-", "-"]
    assert state_line(states[0]) == (
        "a: done  forget 0.300  retain (min) 0.612 "
        "[retain 0.950, retain_late 0.612, near_domain 0.900]"
    )
