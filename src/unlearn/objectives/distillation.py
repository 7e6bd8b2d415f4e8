"""Distillation: the student learns the teacher's whole next-token distribution (UNDO's repair
step, Lee et al. 2025, "Distillation Robustifies Unlearning"; the recipe is
`unlearn.recipes.distill`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from unlearn.methods.base import Phase, StepContext, run_forward
from unlearn.objectives.registry import register_objective
from unlearn.training.losses import kl_retain


@register_objective
class Distillation:
    """KL(teacher || student) per token on the text micro-batch. The teacher is
    `ctx.reference`, a frozen copy; its logits are computed once per micro-batch."""

    name: ClassVar[str] = "distillation"
    summary: ClassVar[str] = "KL(teacher || student) per token (UNDO's distillation)"

    def __init__(self) -> None:
        self.phase: Phase | None = None

    def phases(self, steps: int) -> list[Phase]:
        return [Phase("distill", steps)]

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        batch = ctx.forget
        teacher = ctx.reference.forward(batch).logits
        student = run_forward(ctx.model, batch).logits
        return {"kl": kl_retain(teacher, student, batch.mask)}

    def weights(self, step: int, total_steps: int) -> dict[str, float]:
        return {"kl": 1.0}
