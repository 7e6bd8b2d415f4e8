"""Robustness suites (built-in and files) and the worst-case score, by hand."""

from __future__ import annotations

import pytest

from unlearn.errors import UsageError
from unlearn.robustness.score import (
    CurvePoint,
    attack_row,
    constrained_curve,
    gap,
    half_recovery,
    model_score,
    probe_row,
)
from unlearn.robustness.suite import SUITES, FinetuneAttack, load_suite


def test_builtin_suites_cover_the_issue():
    quick, standard, seeds = SUITES["quick"], SUITES["standard"], SUITES["seeds"]
    assert {a.data for a in quick.attacks} == {"forget", "benign"}
    assert {a.lora for a in standard.attacks} == {True, False}
    assert {a.data for a in standard.attacks} == {"forget", "benign"}
    assert len({a.lr for a in standard.attacks if a.data == "forget" and not a.lora}) >= 3
    assert set(standard.probes) == {"linear", "lens", "ablation", "in_context"}
    assert {a.optimizer for a in seeds.attacks} == {"adamw", "muon"}
    assert all(a.lr == 2e-5 and a.num_examples == 512 and a.eval_every == 100
               for a in seeds.attacks)  # fmt: skip
    assert quick.key() != standard.key() and quick.key() == SUITES["quick"].key()


def test_suite_file_expands_lr_lists(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "attacks:\n  - {data: forget, lora: true, lr: [1e-4, 1e-3], steps: 5}\n"
        "probes: [linear]\nutility_margin: 0.05\n"
    )
    suite = load_suite(str(path))
    assert suite.name == "s" and suite.utility_margin == 0.05
    assert [a.name for a in suite.attacks] == ["forget-lora-lr1e-4", "forget-lora-lr1e-3"]
    assert [a.lr for a in suite.attacks] == [1e-4, 1e-3]  # 1e-3 is a float, not a string


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("attacks: [{data: forget}]\nlayers: [1]\n", "unknown suite field(s) ['layers']"),
        ("attacks: [{data: forget, lrr: 1e-3}]\n", "unknown field(s) ['lrr']"),
        ("attacks: [{data: forget, lr: 0}]\n", "lr must be > 0"),
        ("attacks: [{data: forget, lr: -1e-3}]\n", "lr must be > 0"),
        ("attacks: [{data: poison}]\n", "attack data must be one of"),
        ("probes: [telepathy]\n", "unknown probe 'telepathy'"),
        ("probes: []\n", "has no attack and no probe"),
        ("attacks: [{data: forget}, {data: forget}]\n", "appear twice"),
        ("probes: [linear]\nprobe_layers: [-1]\n", "probe_layers must be integers >= 0"),
        ("attacks: [{data: forget\n", "invalid YAML (line 2, column 1)"),
        ("- linear\n", "a robustness suite must be a mapping"),
    ],
)
def test_bad_suite_files_are_one_line(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=None) as e:
        load_suite(str(path))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_suite_name():
    with pytest.raises(UsageError, match="unknown robustness suite 'fast'"):
        load_suite("fast")
    with pytest.raises(UsageError, match="not found"):
        load_suite("missing.yaml")


def test_utility_constraint_on_a_synthetic_curve():
    # retain starts at 0.90; margin 0.10: steps with retain < 0.80 do not count.
    points = [
        CurvePoint(0, 0.30, 0.90),
        CurvePoint(10, 0.50, 0.85),
        CurvePoint(20, 0.70, 0.79),  # breaks the constraint: the highest, but excluded
        CurvePoint(30, 0.60, 0.80),  # exactly at the floor: counts
        CurvePoint(40, None, 0.90),  # a failed evaluation never counts
    ]
    curve = constrained_curve(points, 0.10)
    assert [r["counts"] for r in curve] == [True, True, False, True, False]
    row = attack_row("a", "finetune-forget", "done", points, 0.10, original=0.90)
    assert row["worst_case"] == 0.60 and row["worst_step"] == 30
    assert row["excluded_steps"] == [20, 40]
    # Half the gap between 0.30 and the original 0.90 is 0.60: first reached (counting) at 30.
    assert (row["steps_to_half"], row["half_note"]) == (30, "")
    assert model_score([row], [])["steps_to_half"] == 30
    assert model_score([row], [])["fastest_attack"] == "a"
    assert half_recovery(curve, 0.25) == (None, "no gap")
    assert half_recovery(curve, 1.0) == (None, "never")
    assert half_recovery(curve, None) == (None, "unknown")


def test_worst_case_selection_by_hand():
    attacks = [
        attack_row("f1", "finetune-forget", "done",
                   [CurvePoint(0, 0.3, 0.9), CurvePoint(5, 0.45, 0.9)], 0.1, None),
        attack_row("b1", "finetune-benign", "done",
                   [CurvePoint(0, 0.3, 0.9), CurvePoint(5, 0.35, 0.9)], 0.1, None),
        # A failed attack is a failed row: its curve (0.99 at step 5) is never a number.
        attack_row("f2", "finetune-forget", "failed",
                   [CurvePoint(0, 0.3, 0.9), CurvePoint(5, 0.99, 0.9)], 0.1, None, "boom"),
    ]  # fmt: skip
    probes = [
        probe_row("linear", "done", {"acc": 0.52, "layer": 2}),
        probe_row("lens", "failed", None, "no lens"),
    ]
    assert attacks[2]["worst_case"] is None and attacks[2]["status"] == "failed"
    assert probes[1]["worst_case"] is None
    score = model_score(attacks, probes)
    assert score["worst_case"] == 0.52 and score["worst_attack"] == "linear"
    assert score["families"] == {"finetune-forget": 0.45, "finetune-benign": 0.35,
                                 "probe-linear": 0.52}  # fmt: skip
    assert score["failed"] == ["f2", "lens"]
    assert gap(0.52, 0.30) == pytest.approx(0.22) and gap(0.52, None) is None
    nothing = model_score([attacks[2]], [probes[1]])
    assert nothing["worst_case"] is None and nothing["worst_attack"] is None


def test_attack_names_and_fields():
    a = FinetuneAttack("benign", 3e-4, lora=True, optimizer="muon")
    assert a.name == "benign-lora-lr3e-4-muon" and a.family == "finetune-benign"
    assert a.overrides()["max_steps"] == 60 and a.overrides()["lora"] is True
    with pytest.raises(UsageError, match="optimizer"):
        FinetuneAttack("forget", 1e-3, optimizer="sgd")
