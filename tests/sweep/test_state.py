"""A point's state as its run directories say it (an unfinished attack has no result yet)."""

from __future__ import annotations

from unlearn import cli
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RunDir
from unlearn.sweep.spec import load_sweep
from unlearn.sweep.state import inspect_point

from .helpers import base_spec, fake_run, write_spec


def test_status_shows_a_running_attacks_status_not_its_partial_curve(tiny_world, tmp_path, capsys):
    spec = write_spec(tmp_path, base_spec(tiny_world, attack={"max_steps": 4}))
    sweep = load_sweep(spec)
    for p in sweep.points:
        fake_run([])(p.run_config)
    first, second = sweep.points
    attack = RunDir(first.attack_dir)
    config = first.attack_config.to_dict()
    attack.write_run(RunMeta(f"{first.id}-attack", "attack", config=config, status="running"))
    attack.append_eval(0, "forget", {"acc": 0.875})  # step 0 of a curve still being drawn
    assert inspect_point(first).attacked_forget is None
    assert cli.main(["sweep", str(spec), "--status"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    cells = [c.strip() for c in rows[first.id].split("|")[1:-1]]
    assert cells[4:] == ["running", "running"] and "0.875" not in out
    cells = [c.strip() for c in rows[second.id].split("|")[1:-1]]
    assert cells[4:] == ["pending", "pending"]
