"""Pure analysis behind the report: tamper summaries, the shared middle step, the Pareto front,
the retain aggregate."""

from __future__ import annotations

import math

import pytest

from unlearn.report.analysis import (
    TamperSummary,
    middle_step,
    pareto_front,
    retain_aggregate,
    tamper_summary,
)

ATTACK_STEPS = [0, 10, 20, 50, 100]


def test_tamper_summary_hand_values():
    s = tamper_summary(list(zip(ATTACK_STEPS, [0.30, 0.50, 0.60, 0.70, 0.75], strict=True)), 0.8)
    # gap 0.5 -> threshold 0.55, first reached at step 20; area 4 + 5.5 + 19.5 + 36.25 = 65.25.
    assert (s.step0, s.final, s.gap, s.half_gap_steps) == (0.30, 0.75, 0.5, 20)
    assert s.recovery == pytest.approx(0.45) and s.auc == pytest.approx(0.6525)
    never = tamper_summary([(0, 0.25), (5, 0.30)], 0.8)
    assert never.half_gap_steps is None and never.auc == pytest.approx(0.275)
    no_gap = tamper_summary([(0, 0.25), (5, 0.30)], 0.2)
    assert no_gap.gap == pytest.approx(-0.05) and no_gap.half_gap_steps is None
    late = tamper_summary([(10, 0.2), (30, 0.6)], 0.6)  # counted from the first step
    assert late.half_gap_steps == 20 and late.auc == pytest.approx(0.4)
    single = tamper_summary([(0, 0.3)], None)
    assert (single.auc, single.gap, single.recovery) == (0.3, None, 0.0)
    with pytest.raises(ValueError):
        tamper_summary([(0, 0.3), (0, 0.4)], 0.8)


def test_tamper_summary_more_hand_values():
    # Uneven steps weigh the trapezoid: (0.25 + 0.5) / 2 * 2 + 0.5 * 8 = 4.75 over 10 steps.
    # (Values exact in binary, so the threshold comparison below is exact too.)
    s = tamper_summary([(0, 0.25), (2, 0.5), (10, 0.5)], 0.75)
    assert s == TamperSummary(0.25, 0.5, 0.25, 0.5, 2, pytest.approx(0.475))
    # The threshold (0.25 + 0.5 / 2 = 0.5) counts when reached exactly, not only when passed.
    assert tamper_summary([(0, 0.25), (4, 0.375), (8, 0.5)], 0.75).half_gap_steps == 8
    # Unknown original: no gap, so no half-recovery step, but recovery and AUC still hold.
    unknown = tamper_summary([(0, 0.5), (10, 0.3)], None)
    assert (unknown.gap, unknown.half_gap_steps) == (None, None)
    assert unknown.recovery == pytest.approx(-0.2) and unknown.auc == pytest.approx(0.4)
    with pytest.raises(ValueError, match="at least one point"):
        tamper_summary([], 0.8)
    with pytest.raises(ValueError, match="increase strictly"):
        tamper_summary([(5, 0.3), (2, 0.4)], 0.8)


def test_pareto_front_and_middle_step():
    points = [(0.3, 0.9), (0.24, 0.6), (0.5, 0.94), (0.4, 0.85), (0.24, 0.5)]
    assert pareto_front(points) == [1, 0, 2]
    assert middle_step([ATTACK_STEPS, ATTACK_STEPS]) == 20
    assert middle_step([[0, 10, 20], [0, 20]]) is None
    assert middle_step([]) is None


def test_pareto_front_edge_cases():
    assert pareto_front([]) == []
    assert pareto_front([(0.3, 0.8)]) == [0]
    # A tie on both values: the first one is kept, the copy beats nothing.
    assert pareto_front([(0.3, 0.8), (0.3, 0.8)]) == [0]
    # Equal forget, higher retain wins; a point worse on both is dropped.
    assert pareto_front([(0.3, 0.7), (0.3, 0.8), (0.4, 0.6)]) == [1]
    # Every point trades off: all on the front, ordered by forget accuracy.
    assert pareto_front([(0.5, 0.9), (0.2, 0.3), (0.35, 0.6)]) == [1, 2, 0]


def test_middle_step_picks_the_middle_shared_interior_step():
    # Shared steps 0, 10, 20, 30, 40: interior 10, 20, 30 -> 20; unshared steps are ignored.
    assert middle_step([[0, 10, 20, 30, 40], [0, 5, 10, 20, 30, 40]]) == 20
    assert middle_step([[0, 10, 20, 30]]) == 20  # interior [10, 20] -> the upper middle
    assert middle_step([[0, 50]]) is None  # endpoints only


def test_the_retain_aggregate_is_the_minimum_and_never_a_number_without_every_result():
    assert retain_aggregate([0.95, 0.62, 0.90]) == 0.62  # the damaged task, not the mean 0.82
    assert retain_aggregate([0.7]) == 0.7
    assert retain_aggregate([0.95, None, 0.9]) is None  # a task never measured: no aggregate
    assert retain_aggregate([0.95, "failed", None]) == "failed"  # a failed eval says so
    assert retain_aggregate([]) is None  # a suite without retain tasks
    assert math.isnan(retain_aggregate([0.5, math.nan]))  # shown as failed, whatever the order
    assert math.isnan(retain_aggregate([math.nan, 0.5]))
