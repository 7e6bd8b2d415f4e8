"""Coefficient and learning-rate schedules, as pure functions of the optimizer step.

Every schedule takes `step` (0-based count of optimizer steps already taken) and `total_steps`
(optimizer steps in the run, or in the phase for the sequential method, whose ramps restart each
phase). Micro-batches and dataset size never enter, so changing gradient accumulation or the
number of processes leaves every schedule unchanged (a pitfall the reference campaign hit).

Conventions:

- Linear coefficient ramps go from their start value at step 0 to their end value at the *last*
  step, `total_steps - 1`, so both end points are actually used by some step.
- A one-step run has no room for a ramp: both coefficient schedules return the nominal `coef`
  (a retain ramp starting at 0 would otherwise switch the retain term off for the whole run).
- LR warmup is linear, `(step + 1) / (warmup_steps + 1)`: the first step already moves (a zero-LR
  step is wasted) and the first full-LR step is step `warmup_steps`. The decay after warmup
  reaches 0 one step after the last, so the last step still has a small non-zero LR.

Argument values a user can set (coefficients, fractions, warmup, decay kind) raise `UsageError`;
a step outside `[0, total_steps)` is a caller bug and raises `ValueError`.
"""

from __future__ import annotations

import math

from unlearn.errors import UsageError

DECAYS = ("constant", "linear", "cosine")


def _check_step(step: int, total_steps: int) -> None:
    if total_steps < 1:
        raise UsageError(f"total_steps must be at least 1, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside [0, {total_steps})")


def _progress(step: int, total_steps: int) -> float:
    """0 at the first step, 1 at the last (callers handle total_steps == 1 themselves)."""
    return step / (total_steps - 1)


def retain_coef_at(step: int, total_steps: int, coef: float, ramp_start: float) -> float:
    """Retain coefficient: linear from `ramp_start * coef` at step 0 to `coef` at the last step."""
    _check_step(step, total_steps)
    if coef < 0:
        raise UsageError(f"retain coefficient must be >= 0, got {coef}")
    if not 0.0 <= ramp_start <= 1.0:
        raise UsageError(f"retain ramp start must be in [0, 1], got {ramp_start}")
    if total_steps == 1:
        return coef
    return coef * (ramp_start + (1.0 - ramp_start) * _progress(step, total_steps))


def forget_coef_at(step: int, total_steps: int, coef: float, end_fraction: float = 0.75) -> float:
    """Forget coefficient: linear from `coef` at step 0 to `end_fraction * coef` at the last."""
    _check_step(step, total_steps)
    if coef < 0:
        raise UsageError(f"forget coefficient must be >= 0, got {coef}")
    if end_fraction < 0:
        raise UsageError(f"forget end fraction must be >= 0, got {end_fraction}")
    if total_steps == 1:
        return coef
    return coef * (1.0 + (end_fraction - 1.0) * _progress(step, total_steps))


def lr_mult_at(step: int, total_steps: int, warmup_steps: int, decay: str = "constant") -> float:
    """Multiplier of the base learning rate: linear warmup, then constant, linear or cosine decay.

    After warmup, with p = (step - warmup_steps) / (total_steps - warmup_steps) in [0, 1):
    constant 1, linear 1 - p, cosine (1 + cos(pi p)) / 2.
    """
    _check_step(step, total_steps)
    if decay not in DECAYS:
        raise UsageError(f"unknown LR decay {decay!r} (choose from {', '.join(DECAYS)})")
    if warmup_steps < 0:
        raise UsageError(f"warmup steps must be >= 0, got {warmup_steps}")
    if warmup_steps >= total_steps:
        # Otherwise the run would end before ever reaching the requested learning rate.
        raise UsageError(
            f"warmup steps ({warmup_steps}) must be fewer than the optimizer steps ({total_steps})"
        )
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    p = (step - warmup_steps) / (total_steps - warmup_steps)
    if decay == "linear":
        return 1.0 - p
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0
