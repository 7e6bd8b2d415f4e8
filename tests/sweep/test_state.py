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
    assert cells[-2:] == ["running", "running"] and "0.875" not in out
    cells = [c.strip() for c in rows[second.id].split("|")[1:-1]]
    assert cells[-2:] == ["pending", "pending"]


def test_an_attack_recorded_before_a_field_existed_is_not_stale(tiny_world, tmp_path):
    """muon_lr / adam_lr came later: an attack whose record lacks them (default None) stays
    done; one that recorded another value is stale."""
    spec = write_spec(tmp_path, base_spec(tiny_world, attack={"max_steps": 4}))
    first = load_sweep(spec).points[0]
    fake_run([])(first.run_config)
    config = first.attack_config.to_dict()
    assert config["muon_lr"] is None and config["adam_lr"] is None
    old = {k: v for k, v in config.items() if k not in ("muon_lr", "adam_lr")}
    attack = RunDir(first.attack_dir)
    attack.write_run(RunMeta(f"{first.id}-attack", "attack", config=old, status="done"))
    attack.append_eval(4, "forget", {"acc": 0.5})
    assert inspect_point(first).attack == "done"
    attack.update(config={**old, "adam_lr": 1e-4})
    assert inspect_point(first).attack == "stale"
