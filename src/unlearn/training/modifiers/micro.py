"""One micro-batch's forward and backward as the training loop does them, for step modifiers.

A step modifier (`unlearn.training.modifiers`) changes where and how often a micro-batch's terms
are evaluated, never how they are computed, weighted, cast or scaled: it calls these two
methods, which are the loop's own plain path (same autocast, same `Parallel.loss`, same
weighting and 1/grad_accum scaling, same scaled backward), so a modifier with nothing to do
gives the loop's losses bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from unlearn.distributed import Parallel
from unlearn.methods.base import StepContext
from unlearn.training.precision import Precision


@dataclass
class MicroBatch:
    """The loop's per-micro-batch machinery: the objective, this step's coefficients, the
    accumulation count, precision, parallelism and the trainable parameters."""

    objective: Any
    weights: Mapping[str, float]
    grad_accum: int
    precision: Precision
    par: Parallel
    params: list[torch.Tensor]

    def terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The objective's named terms on `ctx`, under autocast, through `Parallel.loss`."""
        with self.precision.autocast():
            return self.par.loss(lambda: self.objective.loss(ctx))

    def backward(self, terms: Mapping[str, torch.Tensor]) -> None:
        """Accumulate the gradient of the weighted sum of `terms` / grad_accum into `.grad`
        (scaled under fp16). Nothing to do when no term has a gradient path."""
        total = sum(self.weights.get(n, 0.0) * value for n, value in terms.items())
        if isinstance(total, torch.Tensor) and total.requires_grad:
            self.precision.backward(total / self.grad_accum)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` times the fp16 gradient scale (unchanged otherwise), for gradients taken
        outside `backward` whose size is normalised away: they must not underflow in fp16."""
        scaler = self.precision.scaler
        return scaler.scale(loss) if scaler is not None else loss  # type: ignore[return-value]
