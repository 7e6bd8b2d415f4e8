"""`unlearn distill` (UNDO): the student starts from perturbed weights, not the teacher's, and
ends closer to the teacher's outputs than it started; bad values are one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tiny_models import tiny_gpt_neox
from unlearn.cli import main as cli
from unlearn.fsutil import read_jsonl
from unlearn.recipes.distill import perturb_weights


@pytest.mark.parametrize("mode", ["mix", "noise"])
def test_perturbation_moves_every_tensor_by_alpha(mode):
    teacher = tiny_gpt_neox(2, 64, seed=0)
    student = copy.deepcopy(teacher)
    perturb_weights(student, 0.0, mode, seed=1)
    pairs = lambda: zip(teacher.parameters(), student.parameters(), strict=True)  # noqa: E731
    assert all(torch.equal(a, b) for a, b in pairs())
    perturb_weights(student, 0.5, mode, seed=1)
    # Every matrix moves (biases and norms start at 0 and 1 in both models, so a mix keeps them).
    assert all(not torch.equal(a, b) for a, b in pairs() if a.ndim == 2)
    if mode == "mix":  # halfway between the teacher and a fresh initialisation
        fresh = copy.deepcopy(teacher)
        perturb_weights(fresh, 1.0, "mix", seed=1)
        params = (teacher.parameters(), student.parameters(), fresh.parameters())
        for t, s, f in zip(*params, strict=True):
            torch.testing.assert_close(s, 0.5 * t + 0.5 * f)


def test_distill_starts_perturbed_and_ends_closer_to_the_teacher(tiny_world, tmp_path):
    teacher_run = tmp_path / "teacher"
    assert cli(["run", "--method", "npo", "--world", str(tiny_world.root), "--out",
                str(teacher_run), "--max_steps", "2", "--progress", "false"]) == 0  # fmt: skip
    out = tmp_path / "undo"
    rc = cli(["distill", "--teacher", str(teacher_run), "--world", str(tiny_world.root), "--out",
              str(out), "--alpha", "0.5", "--max_steps", "30", "--progress", "false"])  # fmt: skip
    assert rc == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["kind"] == "unlearn" and meta["method"] == "distill"
    assert meta["parent"] == json.loads((teacher_run / "run.json").read_text())["id"]
    assert 0 < meta["final"]["compute_fraction"] < 1
    kl = [r["value"] for r in read_jsonl(out / "metrics.jsonl") if r["name"] == "kl"]
    # Step 1's KL is measured before any update: a student equal to its teacher would read 0.
    assert kl[0] > 0.1 and kl[-1] < 0.5 * kl[0], (kl[0], kl[-1])
    tasks = {r["task"] for r in read_jsonl(out / "evals.jsonl") if r["metric"] == "acc"}
    assert tasks == set(tiny_world.questions)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
        (["--alpha", "-0.1"], "--alpha must be in [0, 1]"),
        (["--perturb", "shuffle"], "--perturb must be one of"),
    ],
)
def test_bad_distill_values_exit_2(tiny_world, tmp_path, capsys, args, needle):
    out = tmp_path / "d"
    rc = cli(["distill", "--teacher", str(tiny_world.target), "--world", str(tiny_world.root),
              "--out", str(out), *args])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists()
