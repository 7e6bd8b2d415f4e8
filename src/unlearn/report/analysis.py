"""Pure analysis behind the report: numbers in, numbers out (no store, no formatting).

- `tamper_summary`: how far an attack's forget-accuracy curve recovers towards the original
  model's accuracy, how fast, and its mean along the attack.
- `middle_step`: the interior evaluation step every attack curve shares (a "step N" column).
- `pareto_front`: the (forget, retain) points no other point beats.
- `retain_aggregate`: the one "retain" number of a run, the minimum over its retain tasks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

Value = float | str | None
"""A result as summaries hold it: a number, a word saying why there is none ("failed", a run
status), or None (never measured)."""


def retain_aggregate(values: Sequence[Value]) -> Value:
    """The "retain" of a run, wherever one number stands for it (sweep tables and progress lines,
    the report's forget-vs-retain plot, the choice of a best run): the minimum accuracy over the
    suite's retain tasks, given in any order.

    The minimum, not the mean: unlearning must keep every kind of retained knowledge (general
    facts, facts learned late, benign facts about the forget domain's entities), and a mean lets a
    task the method did not damage hide one it did. A run missing a retain result has no
    aggregate: the first word among the values if one failed (e.g. "failed"), else None (shown
    "-"); so does a suite without retain tasks.
    """
    words = [v for v in values if isinstance(v, str)]
    if words:
        return words[0]
    if not values or any(v is None for v in values):
        return None
    numbers = [float(v) for v in values]  # type: ignore[arg-type]
    # min() with a NaN depends on the order; a non-finite result is shown as failed anyway.
    return min(numbers) if all(math.isfinite(v) for v in numbers) else math.nan


@dataclass(frozen=True)
class TamperSummary:
    """Summary of one attack's forget-accuracy curve."""

    step0: float
    """Accuracy at the first evaluated step (the attack evaluates before its first update)."""
    final: float
    recovery: float
    """final - step0."""
    gap: float | None
    """original_acc - step0: what there is to recover (None when the original is unknown)."""
    half_gap_steps: int | None
    """Attack steps until the accuracy first reaches step0 + gap / 2 (at an evaluated step);
    None when it never does or there is no positive gap."""
    auc: float
    """Trapezoid area under the curve divided by the step range: the mean accuracy along the
    attack (the single value for a one-point curve)."""


def tamper_summary(curve: Sequence[tuple[int, float]], original_acc: float | None) -> TamperSummary:
    """Summarise an attack curve [(step, acc), ...] against the original model's accuracy."""
    if not curve:
        raise ValueError("an attack curve needs at least one point")
    steps = [s for s, _ in curve]
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"attack curve steps must increase strictly, got {steps}")
    (first, step0), (last, final) = curve[0], curve[-1]
    gap = None if original_acc is None else original_acc - step0
    half = None
    if gap is not None and gap > 0:
        threshold = step0 + gap / 2
        half = next((s - first for s, acc in curve if acc >= threshold), None)
    if last == first:
        auc = step0
    else:
        area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in itertools.pairwise(curve))
        auc = area / (last - first)
    return TamperSummary(step0, final, final - step0, gap, half, auc)


def middle_step(curves: Sequence[Sequence[int]]) -> int | None:
    """An interior step shared by every curve (the middle one), for a "step N" column."""
    if not curves:
        return None
    common = sorted(set.intersection(*(set(c) for c in curves)))
    interior = common[1:-1]
    return interior[len(interior) // 2] if interior else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (forget, retain) points no other point beats (lower forget and higher
    retain, one of them strictly), ordered by forget accuracy."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
