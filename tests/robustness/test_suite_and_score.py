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

R = {"retain": 0.9}
"""A retain task that holds still."""


def test_builtin_suites_cover_the_issue():
    quick, standard, campaign = SUITES["quick"], SUITES["standard"], SUITES["campaign"]
    assert {a.data for a in quick.attacks} == {"forget", "benign"}
    assert {a.lora for a in standard.attacks} == {True, False}
    assert {a.data for a in standard.attacks} == {"forget", "benign"}
    assert len({a.lr for a in standard.attacks if a.data == "forget" and not a.lora}) >= 3
    assert set(standard.probes) == {"linear", "lens", "ablation", "in_context"}
    assert {a.optimizer for a in campaign.attacks} == {"adamw", "muon"}
    assert all(a.lr == 2e-5 and a.num_examples == 512 and a.eval_every == 100
               for a in campaign.attacks)  # fmt: skip
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
        # Fields of the wrong type: one line naming the field, never Python's own TypeError.
        ('probes: [linear]\nutility_margin: "abc"\n', "utility_margin must be a number"),
        ("probes: [linear]\nutility_margin: true\n", "utility_margin must be a number"),
        ('probes: [in_context]\nin_context_k: "x"\n', "in_context_k must be an integer"),
        ("probes: [in_context]\nin_context_k: 1.5\n", "in_context_k must be an integer"),
        ('probes: [linear]\neval_limit: "5"\n', "eval_limit must be an integer"),
        ("attacks: [{data: forget, name: 7}]\n", "attacks[0]: attack name must be a plain"),
        ("attacks: [{data: forget, lora: 'yes'}]\n", "attacks[0]: attack lora must be true"),
        ("attacks: [{data: forget, steps: '5'}]\n", "attacks[0]: attack steps must be"),
        ("probes: [linear]\nprobe_layers: [true]\n", "probe_layers must be integers >= 0"),
        ("probes: [linear]\nprobe_layers: 2\n", "probe_layers must be a list"),
        # A name becomes a folder under --cache: no path separator, no way out of it.
        ("name: ../../escape\nprobes: [linear]\n", "suite name must be a plain name"),
        ("name: a/b\nprobes: [linear]\n", "suite name must be a plain name"),
        ("name: ..\nprobes: [linear]\n", "suite name must be a plain name"),
        ("name: 7\nprobes: [linear]\n", "suite name must be a plain name"),
        ("attacks: [{data: forget, name: ../x}]\n", "attack name must be a plain name"),
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
        CurvePoint(0, 0.30, {"r": 0.90}),
        CurvePoint(10, 0.50, {"r": 0.85}),
        CurvePoint(20, 0.70, {"r": 0.79}),  # breaks the constraint: the highest, but excluded
        CurvePoint(30, 0.60, {"r": 0.80}),  # exactly at the floor: counts
        CurvePoint(40, None, {"r": 0.90}),  # a failed evaluation never counts
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
                   [CurvePoint(0, 0.3, R), CurvePoint(5, 0.45, R)], 0.1, None),
        attack_row("b1", "finetune-benign", "done",
                   [CurvePoint(0, 0.3, R), CurvePoint(5, 0.35, R)], 0.1, None),
        # A failed attack is a failed row: its curve (0.99 at step 5) is never a number.
        attack_row("f2", "finetune-forget", "failed",
                   [CurvePoint(0, 0.3, R), CurvePoint(5, 0.99, R)], 0.1, None, "boom"),
    ]  # fmt: skip
    probes = [
        probe_row("linear", "done", {"acc": 0.52, "layer": 2}),
        probe_row("lens", "failed", None, "no lens"),
    ]
    assert attacks[2]["worst_case"] is None and attacks[2]["status"] == "failed"
    assert probes[1]["worst_case"] is None
    complete = model_score(attacks[:2], probes[:1])
    assert complete["complete"] and complete["missing_families"] == []
    assert complete["worst_case"] == 0.52 == complete["worst_case_lower_bound"]
    assert complete["worst_attack"] == "linear"
    # With a failed attack and a failed probe the suite is partial: the highest number seen is
    # only a lower bound, never the worst case, and the families without a result are named.
    score = model_score(attacks, probes)
    assert score["worst_case"] is None and not score["complete"]
    assert score["worst_case_lower_bound"] == 0.52 and score["worst_attack"] == "linear"
    assert score["missing_families"] == ["finetune-forget", "probe-lens"]
    assert score["families"] == {"finetune-benign": 0.35, "probe-linear": 0.52}
    assert score["failed"] == ["f2", "lens"]
    assert gap(0.52, 0.30) == pytest.approx(0.22) and gap(0.52, None) is None
    assert gap(score["worst_case"], 0.30) is None  # no gap from a partial worst case
    nothing = model_score([attacks[2]], [probes[1]])
    assert nothing["worst_case"] is None and nothing["worst_attack"] is None
    assert nothing["worst_case_lower_bound"] is None and not nothing["complete"]


def test_utility_constraint_holds_every_retain_task_to_its_own_start():
    # "b" falls 0.30 below its own start while the minimum over tasks ("a") does not move: the
    # step breaks the constraint although min(retain) stays at its step-0 value.
    points = [
        CurvePoint(0, 0.30, {"a": 0.50, "b": 0.90}),
        CurvePoint(5, 0.80, {"a": 0.50, "b": 0.60}),
        CurvePoint(10, 0.40, {"a": 0.45, "b": 0.85}),
        CurvePoint(15, 0.90, {"a": 0.50, "b": None}),  # a failed retain evaluation never counts
    ]
    curve = constrained_curve(points, 0.10)
    assert [r["counts"] for r in curve] == [True, False, True, False]
    assert [r["retain"] for r in curve[:3]] == [0.50, 0.50, 0.45]  # the minimum, as shown
    row = attack_row("a", "finetune-forget", "done", points, 0.10, None)
    assert row["worst_case"] == 0.40 and row["excluded_steps"] == [5, 15]


def test_a_diverged_attack_keeps_the_steps_before_it_diverged():
    points = [CurvePoint(0, 0.30, R), CurvePoint(5, 0.55, R), CurvePoint(10, 0.62, R)]
    row = attack_row("hot", "finetune-forget", "diverged", points, 0.1, None, "loss exploded")
    assert row["worst_case"] == 0.62 and row["worst_step"] == 10 and row["diverged_after"] == 10
    score = model_score([row], [])
    assert score["complete"] and score["worst_case"] == 0.62
    # A diverged attack with no evaluated step has no number: a failed row.
    empty = attack_row("hot", "finetune-forget", "diverged", [], 0.1, None, "loss exploded")
    assert empty["worst_case"] is None and empty["status"] == "failed"


def test_attack_names_and_fields():
    a = FinetuneAttack("benign", 3e-4, lora=True, optimizer="muon")
    assert a.name == "benign-lora-lr3e-4-muon" and a.family == "finetune-benign"
    assert a.overrides()["max_steps"] == 60 and a.overrides()["lora"] is True
    with pytest.raises(UsageError, match="optimizer"):
        FinetuneAttack("forget", 1e-3, optimizer="sgd")
