"""Gradient difference (GradDiff): gradient ascent on forget text, descent on retain text.

    forget = - CE(π_θ, forget)          (ascend the LM loss: nats per token, negated)
    retain = CE(π_θ, retain)            (default; --retain_loss kl or l2 also work)

The oldest unlearning baseline (Liu et al. 2022, "Continual learning and private unlearning";
the GradDiff of the TOFU and WMDP comparisons). Ascent has no floor: the forget CE grows without
bound as the model drives the forget tokens' probabilities to zero, and the model with them.
It is not hidden: the trainer's divergence guard (`--diverge_factor`, a term above that multiple
of its first value) stops such a run and marks it `diverged`. `--ascent_cap C` bounds the ascent
instead: each token's CE counts up to C nats and no further, so tokens already forgotten stop
pulling (the bounded variant; 0 = no cap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from unlearn.errors import UsageError
from unlearn.methods.base import SCHEDULED, Method, MethodConfig, StepContext, run_forward
from unlearn.methods.registry import register
from unlearn.training import losses


@dataclass
class GradDiffConfig(MethodConfig):
    retain_coef: float = 50.0
    retain_loss: str = "ce"
    ascent_cap: float = 0.0
    """Count each forget token's CE only up to this many nats (0: unbounded ascent, stopped by
    the divergence guard)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ascent_cap >= 0:
            raise UsageError(f"--ascent_cap must be >= 0, got {self.ascent_cap}")


def capped_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, cap: float):
    """Masked token mean of min(CE, cap) (cap 0: plain CE), over the pairs `lm_ce` scores."""
    if cap <= 0:
        return losses.lm_ce(logits, input_ids, mask)
    token = -losses.token_logprobs(logits, input_ids, mask)[:, 1:]
    valid = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    return losses.masked_mean(token.clamp(max=cap), valid)


@register
class GradDiff(Method):
    name = "grad_diff"
    summary = "gradient ascent on forget text, descent on retain text (Liu et al. 2022)"
    config_cls = GradDiffConfig
    uses = SCHEDULED  # no target layers, no forget_loss: its forget term is its own
    # Calibrated on the default world (docs/results/baselines):
    # 256 full fine-tuning steps at lr 1e-4
    # with retain_coef 50 reach forget 0.25 with every retain task within 0.05 of the target's;
    # retain_coef 20 loses late facts (0.91), 128 steps at retain_coef 30 stop at 0.36.
    train_defaults: ClassVar[dict] = {"lr": 1e-4, "lora": False, "num_train_examples": 2048}

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        f = ctx.forget
        logits = run_forward(ctx.model, f).logits
        return {
            "forget": -capped_ce(logits, f.input_ids, f.mask, self.cfg.ascent_cap),
            "retain": self.retain(ctx),
        }
