"""Plain language-model fine-tuning as a training-loop objective.

Used by the tamper attack (next-token CE on forget-domain text) and as the cost baseline of
bench/step_cost.py (CE on the forget and the retain micro-batch).
"""

from __future__ import annotations

import torch

from unlearn.losses import kl_retain, lm_ce
from unlearn.methods.base import Phase, StepContext, run_forward


class LanguageModeling:
    """Next-token cross-entropy on the forget micro-batch (and on the retain one if asked)."""

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


class Distillation:
    """KL(teacher || student) per token on the text micro-batch: the student learns the
    teacher's whole output distribution (UNDO's distillation step, `recipes.distill`). The
    teacher is `ctx.reference`, a frozen copy; its logits are computed once per micro-batch."""

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
