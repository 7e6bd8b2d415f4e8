"""A sweep's or a search's `out:` (both here: they share the stand-in runs) follows a run's
--out rules: never the user's own non-empty folder, never a folder holding (or inside) the input
models, never a run directory or the other command's output; its own output is continued."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from helpers import patch_runs
from helpers import spec as search_spec

from unlearn.cli import main as cli
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RunDir
from unlearn.world import load_world

SWEEP_BASE = {"num_train_examples": 8, "pdbs": 2, "grad_accum": 1, "max_steps": 2,
              "progress": False}  # fmt: skip


def _spec(kind: str, world, tmp_path: Path, out: Path) -> Path:
    if kind == "search":
        raw = search_spec(world, tmp_path, budget=1)
        raw["space"] = {"retain_coef": {"float": [15, 20]}}  # the stand-in's constraint holds
    else:
        raw = {"name": "s", "world": str(world.root), "method": "sequential",
               "base": dict(SWEEP_BASE), "grid": {"retain_coef": [1]}}  # fmt: skip
    raw["out"] = str(out)
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _refused(kind: str, path: Path, capsys, *words: str) -> None:
    assert cli([kind, str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


@pytest.mark.parametrize("kind", ["sweep", "search"])
def test_out_is_never_a_foreign_folder(kind, tiny_world, tmp_path, monkeypatch, capsys):
    patch_runs(monkeypatch, [])
    # The user's own folder.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious\n")
    _refused(kind, _spec(kind, tiny_world, tmp_path, mine), capsys, "not empty")
    assert _listing(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "precious\n"

    # A folder holding the input models (a world's models/), and one inside a model.
    world = tmp_path / "world"
    shutil.copytree(tiny_world.root, world, ignore=shutil.ignore_patterns("frozen-cache", "lenses",
                                                                          "affine"))  # fmt: skip
    before = _listing(world)
    copy = load_world(world)
    for out in (world / "models", world / "models" / "target" / "runs"):
        _refused(kind, _spec(kind, copy, tmp_path, out), capsys, "overlaps", "model")
    assert _listing(world) == before

    # A run directory, and the other command's output.
    run = tmp_path / "run"
    RunDir(run).write_run(RunMeta("r", "unlearn", "sequential", status="done"))
    _refused(kind, _spec(kind, tiny_world, tmp_path, run), capsys)
    assert _listing(run) == ["run.json"]
    other = "search" if kind == "sweep" else "sweep"
    theirs = tmp_path / "theirs"
    assert cli([other, str(_spec(other, tiny_world, tmp_path, theirs))]) == 0
    before = _listing(theirs)
    _refused(kind, _spec(kind, tiny_world, tmp_path, theirs), capsys, f"holds a {other}")
    assert _listing(theirs) == before

    # Its own output: continued.
    ours = tmp_path / "ours"
    path = _spec(kind, tiny_world, tmp_path, ours)
    assert cli([kind, str(path)]) == 0
    assert cli([kind, str(path)]) == 0
