"""Search spec validation: every bad spec is one line on stderr, exit 2, before anything trains
or is written; good specs build their space, goal and reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import spec, write

from unlearn.cli import main
from unlearn.search.spec import load_search

BAD = {
    "unknown parameter": ({"space": {"nope": {"float": [0, 1]}}}, "unknown field"),
    "unknown method": ({"method": "forget_all"}, "forget_all"),
    "inverted range": ({"space": {"retain_coef": {"float": [5, 1]}}}, "inverted range"),
    "empty range": ({"space": {"retain_coef": {"float": [2, 2]}}}, "empty or inverted"),
    "log bound at 0": ({"space": {"lr": {"log": [0, 1e-3]}}}, "bounds > 0"),
    "negative log bound": ({"space": {"lr": {"log": [-1e-3, 1e-3]}}}, "bounds > 0"),
    "budget 0": ({"budget": 0}, "budget"),
    "no budget": ({"budget": None}, "budget"),
    "unknown goal": ({"goal": "fastest"}, "goal must be one of"),
    "no retain task": ({"eval": {"forget_tasks": ["forget"]}}, "needs a retain task"),
    "int range on a float field": ({"space": {"lr": {"int": [1, 3]}}}, "integer field"),
    "float range on an int field": ({"space": {"lora_r": {"float": [1, 3]}}}, "use int"),
    "bad kind": ({"space": {"lr": {"uniform": [0.1, 0.2]}}}, "give one of"),
    "range of three": ({"space": {"lr": {"float": [0.1, 0.2, 0.3]}}}, "[low, high]"),
    "choice not a value": ({"space": {"optimizer": {"choice": ["adamw", 3]}}}, "optimizer"),
    "value its field refuses": ({"space": {"lr": {"float": [-1.0, 1e-3]}}}, "lr"),
    "searched and fixed": ({"space": {"max_steps": {"int": [1, 3]}}}, "both fixed"),
    "set by the search": ({"space": {"out": {"choice": ["a", "b"]}}}, "set by the search"),
    "robustness with boundary": ({"robustness": "quick"}, "pareto goal's third objective"),
    "pruner with pareto": ({"goal": "pareto", "pruner": "median"}, "single-objective"),
    "unknown key": ({"budjet": 3}, "budjet"),
    "delta out of range": ({"delta": 1.5}, "delta"),
    "intermediate 1": ({"intermediate": 1}, "intermediate"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_spec_is_one_line_and_exit_2(tiny_world, tmp_path, capsys, case):
    change, message = BAD[case]
    raw = spec(tiny_world, tmp_path, **change)
    raw = {k: v for k, v in raw.items() if v is not None}
    assert main(["search", str(write(tmp_path, raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written, nothing trained


def test_two_methods_make_the_method_a_parameter(tiny_world, tmp_path, capsys):
    raw = spec(tiny_world, tmp_path, goal="pareto")
    del raw["method"]
    raw["methods"] = [
        {"method": "sequential"},
        {"method": "rr", "space": {"lr": {"log": [1e-4, 1e-2]}}},
    ]
    path = write(tmp_path, raw)
    search = load_search(path)
    assert [b.method for b in search.blocks] == ["sequential", "rr"]
    # The top-level space is every block's; a block adds its own.
    assert [p.field for p in search.block("rr").params] == ["retain_coef", "lr"]
    assert search.objectives == ("forget", "retain") and search.pruner == "none"
    assert main(["search", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rr.lr: log [0.0001, 0.01]" in out and "sequential.retain_coef" in out


def test_the_reference_is_the_target_and_the_world_baselines_follow(tiny_world, tmp_path):
    search = load_search(write(tmp_path, spec(tiny_world, tmp_path)))
    roles = [p.baseline.role for p in search.baselines]
    assert roles == ["target", "ignorant", "filtered"]
    assert search.baselines[0].baseline.model_args.model == str(tiny_world.target)
    assert search.retain_tasks == ("retain", "retain_late", "near_domain")
    assert search.journal == tmp_path / "out" / "study.journal"


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "searches"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_searches_validate(tiny_world, tmp_path, name):
    """The example specs (written for the default world) validate on the tiny world."""
    raw = yaml.safe_load((EXAMPLES / name).read_text())
    raw.update(world=str(tiny_world.root), out=str(tmp_path / "out"))
    search = load_search(write(tmp_path, raw), check_hub=False)
    assert search.budget <= 40 and search.blocks


def test_a_search_md_or_best_yaml_someone_else_wrote_is_never_overwritten(
    tiny_world, tmp_path, capsys
):
    (tmp_path / "out").mkdir()
    mine = tmp_path / "out" / "best.yaml"
    mine.write_text("lr: 1.0e-3   # my own notes\n")
    assert main(["search", str(write(tmp_path, spec(tiny_world, tmp_path)))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not written by a search" in err[0]
    assert mine.read_text() == "lr: 1.0e-3   # my own notes\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["best.yaml"]
