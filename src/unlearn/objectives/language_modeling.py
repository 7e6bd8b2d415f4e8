"""Plain language-model fine-tuning: next-token cross-entropy.

Used by the tamper attack (CE on forget-domain text) and as the cost baseline of
bench/step_cost.py (CE on the forget and the retain micro-batch).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from unlearn.methods.base import Phase, StepContext, run_forward
from unlearn.objectives.registry import register_objective
from unlearn.training.losses import lm_ce


@register_objective
class LanguageModeling:
    """Next-token cross-entropy on the forget micro-batch (and on the retain one if asked)."""

    name: ClassVar[str] = "language_modeling"
    summary: ClassVar[str] = "next-token cross-entropy (the fine-tuning attack)"

    def __init__(self, with_retain: bool = False) -> None:
        self.with_retain = with_retain
        self.phase: Phase | None = None

    def phases(self, steps: int) -> list[Phase]:
        return [Phase("finetune", steps)]

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        batches = {"lm": ctx.forget}
        if self.with_retain:
            batches = {"forget": ctx.forget, "retain": ctx.retain}
        return {
            name: lm_ce(run_forward(ctx.model, b).logits, b.input_ids, b.mask)
            for name, b in batches.items()
        }

    def weights(self, step: int, total_steps: int) -> dict[str, float]:
        return {"lm": 1.0, "forget": 1.0, "retain": 1.0}
