"""The attack search's sampler loop, with attacks scored by a stand-in (no training)."""

from __future__ import annotations

import math

import pytest

from unlearn.errors import UsageError
from unlearn.robustness.attack_search import (
    attack_of,
    best_row,
    params_of,
    search_attacks,
)
from unlearn.robustness.suite import AttackSpace, FinetuneAttack

GRID = [FinetuneAttack("forget", 1e-3, steps=60), FinetuneAttack("benign", 1e-3, steps=40)]


def damage(attack: FinetuneAttack) -> float | None:
    """A made-up landscape: forget data at lr near 3e-3 is the most damaging; lr above 1e-2
    breaks the model (no step keeps the retain tasks)."""
    if attack.lr > 1e-2:
        return None
    peak = 0.9 if attack.data == "forget" else 0.5
    return peak - 0.1 * abs(math.log10(attack.lr / 3e-3)) + 0.001 * attack.steps / 60


def fake_run(seen: list[FinetuneAttack]):
    def run(attack: FinetuneAttack) -> dict:
        seen.append(attack)
        return {"name": attack.name, "family": "finetune-searched", "worst_case": damage(attack)}

    return run


def test_the_search_runs_its_budget_and_starts_from_the_grid():
    seen: list[FinetuneAttack] = []
    grid = [(a, damage(a)) for a in GRID]
    rows = search_attacks(6, 0, AttackSpace(), grid, fake_run(seen))
    assert [a.name for a in seen] == [f"search-{i:02d}" for i in range(6)]
    assert len(rows) == 6 and all("search_params" in r for r in rows)
    # Trials are new configurations, inside the space.
    space = AttackSpace()
    for a in seen:
        assert space.lr[0] <= a.lr <= space.lr[1] and a.steps in space.steps
        assert (a.lora_r if a.lora else 0) in space.lora_ranks and a.data in space.data
    best = best_row(rows)
    assert best is not None and best["worst_case"] == max(r["worst_case"] or 0 for r in rows)


def test_the_same_seed_and_results_replay_the_same_trials():
    first: list[FinetuneAttack] = []
    second: list[FinetuneAttack] = []
    grid = [(a, damage(a)) for a in GRID]
    search_attacks(5, 3, AttackSpace(), grid, fake_run(first))
    search_attacks(5, 3, AttackSpace(), grid, fake_run(second))
    assert first == second
    other: list[FinetuneAttack] = []
    search_attacks(5, 4, AttackSpace(), grid, fake_run(other))
    assert other != first


def test_a_trial_without_a_result_scores_zero_and_the_search_goes_on():
    seen: list[FinetuneAttack] = []
    space = AttackSpace(lr=(2e-2, 3e-2))  # every trial breaks the model
    rows = search_attacks(3, 0, space, [], fake_run(seen))
    assert len(seen) == 3 and all(r["worst_case"] is None for r in rows)
    assert best_row(rows) is None


def test_grid_attacks_round_trip_through_the_parameters():
    lora = FinetuneAttack("forget", 1e-2, lora=True, lora_r=8, steps=60)
    for attack in (GRID[0], lora):
        back = attack_of(params_of(attack), "x", AttackSpace(eval_every=attack.eval_every))
        assert (back.data, back.lr, back.lora, back.steps) == (
            attack.data, attack.lr, attack.lora, attack.steps,
        )  # fmt: skip
        assert back.lora_r == attack.lora_r or not attack.lora


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": (1e-3, 1e-4)}, "lr range"),
        ({"lr": (0.0, 1e-3)}, "lr range"),
        ({"steps": ()}, "steps"),
        ({"steps": (0, 10)}, "steps"),
        ({"lora_ranks": (-1,)}, "lora_ranks"),
        ({"data": ("web",)}, "data"),
        ({"lr": 1e-3}, "must be a list"),
        ({"eval_every": 0}, "eval_every"),
    ],
)
def test_a_bad_search_space_is_one_usage_error(kwargs, message):
    with pytest.raises(UsageError, match=message):
        AttackSpace(**kwargs)


def test_a_searched_suite_reaches_at_least_the_grids_worst_case(tiny_world, tmp_path):
    """On the tiny world's target, a grid of one short forget attack and a search of two new
    trials: the searched column is at least the grid's, each trial is an attack run of its own,
    and a rerun reuses them."""
    import json

    from unlearn.cli import main as cli

    suite, store, out = tmp_path / "s.yaml", tmp_path / "store.sqlite", tmp_path / "rb"
    suite.write_text(
        "attacks: [{data: forget, lr: 0.001, steps: 10, eval_every: 5}]\n"
        "attack_budget: 2\n"
        "attack_space: {steps: [5, 10], lora_ranks: [0, 4], eval_every: 5}\n"
        "eval_limit: 24\n"
    )
    argv = ["robustness", "--model", str(tiny_world.target), "--world", str(tiny_world.root),
            "--out", str(out), "--suite", str(suite), "--references", "false",
            "--progress", "false", "--store", str(store)]  # fmt: skip
    assert cli(argv) == 0
    row = json.loads((out / "robustness.json").read_text())["models"]["rb"]
    assert row["status"] == "done" and row["complete"]
    rows = {r["name"]: r for r in row["attacks"]}
    assert list(rows) == ["forget-full-lr1e-3", "search-start", "search-00", "search-01"]
    assert rows["search-start"]["reused_from"] == "forget-full-lr1e-3"
    families = row["families"]
    assert families["finetune-searched"] >= families["finetune-forget"]
    assert families["finetune-searched"] == max(
        r["worst_case"] for n, r in rows.items() if n.startswith("search-")
    )
    for name in ("search-00", "search-01"):
        params = rows[name]["search_params"]
        assert params["steps"] in (5, 10) and params["rank"] in (0, 4)
        config = json.loads((out / "attacks" / name / "run.json").read_text())["config"]
        assert config["max_steps"] == params["steps"] and config["lora"] == (params["rank"] > 0)
    runs = sorted((out / "attacks").glob("*/run.json"))
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    assert cli(argv) == 0  # the same seed and results: the same trials, reused
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps

    assert cli(["report", "--store", str(store), "--out", str(tmp_path / "report")]) == 0
    assert "fine-tune, searched" in (tmp_path / "report" / "report.md").read_text()


def test_attack_budget_flag_is_checked_before_anything_loads(tmp_path, capsys):
    from unlearn.cli import main as cli

    argv = ["robustness", "--model", str(tmp_path), "--out", str(tmp_path / "o"),
            "--attack_budget", "-1"]  # fmt: skip
    assert cli(argv) == 2
    assert "attack_budget must be an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
