"""`unlearn robustness --report_to tensorboard`: the robustness run, its attacks and its probes
reported in one group (the robustness run's id), each under its own run id."""

from __future__ import annotations

from unlearn.cli import main as cli
from unlearn.runs.rundir import RunDir

from .helpers import scalars, tracking_free

SUITE = """\
attacks:
  - {data: forget, lr: 1e-3, steps: 2, eval_every: 2, pdbs: 4}
probes: [ablation]
eval_limit: 8
"""


def test_robustness_runs_report_in_one_group(tiny_world, tmp_path):
    suite, out, board = tmp_path / "suite.yaml", tmp_path / "rb", tmp_path / "board"
    suite.write_text(SUITE)
    assert cli(["robustness", "--model", str(tiny_world.checkpoints[-2]), "--world",
                str(tiny_world.root), "--out", str(out), "--suite", str(suite), "--references",
                "false", "--label", "ckpt", "--progress", "false", "--report_to", "tensorboard",
                "--tracking_dir", str(board), "--project", "p"]) == 0  # fmt: skip
    group = board / "p" / "robustness-ckpt"
    attack, probe = "robustness-ckpt-forget-full-lr1e-3", "robustness-ckpt-ablation"
    assert sorted(d.name for d in group.iterdir()) == sorted(["robustness-ckpt", attack, probe])
    curve = scalars(group / attack)
    assert [s for s, _ in curve["eval/forget_heldout/acc"]] == [0, 2]
    assert [s for s, _ in curve["train/lm"]] == [1, 2]
    assert "eval/forget_heldout/acc" in scalars(group / probe)
    summary = scalars(group / "robustness-ckpt")
    worst = RunDir(out).read().evals
    for e in worst:
        if e.value is not None:
            assert f"eval/{e.task}/{e.metric}" in summary
    assert "final/eval/forget_heldout/worst_case" in summary
    for run in (out, out / "attacks" / "forget-full-lr1e-3", out / "probes" / "ablation"):
        assert tracking_free(RunDir(run).read_meta().config)
