"""SimNPO (Fan, Liu, Lin, Jia, Zhang, Mei and Liu 2024, "Simplicity Prevails: Rethinking Negative
Preference Optimization for LLM Unlearning"): NPO without the reference model, normalised by the
sequence's length.

    forget = -(2/β) · mean_seq log σ(-(β/|y|) · log π_θ(y|x) - γ)
           = (2/β) · mean_seq softplus((β/|y|) · log π_θ(y) + γ)
    retain = KL(π_original || π_θ) on retain text   (default; ce, l2, mse also work)

|y| is the number of scored tokens of the forget sequence, so long and short documents weigh
alike (NPO's reference ratio favours long ones); γ is a reward margin (0 in most of the
paper's settings). No reference forward on forget text is needed.
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
class SimNPOConfig(MethodConfig):
    retain_coef: float = 20.0
    retain_loss: str = "kl"
    beta: float = 2.5
    """Inverse temperature β (the paper's WMDP setting: 2.5)."""
    gamma: float = 0.0
    """Reward margin γ."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise UsageError(f"--beta must be > 0, got {self.beta}")
        if not self.gamma >= 0:
            raise UsageError(f"--gamma must be >= 0, got {self.gamma}")


@register
class SimNPO(Method):
    name = "simnpo"
    summary = "NPO without a reference model, length-normalised (Fan et al. 2024)"
    config_cls = SimNPOConfig
    uses = SCHEDULED  # no target layers, no forget_loss: its forget term is its own
    # Calibrated on the default world (docs/results/baselines):
    # the best found keeps every retain task
    # within 0.05 of the target's at forget 0.42 (1024 full fine-tuning steps at lr 3e-4, KL
    # retain at 20); lr 1e-3 reaches 0.43-0.48 but retain_late falls to 0.80. It does not reach
    # the 0.35 target.
    train_defaults: ClassVar[dict] = {"lr": 3e-4, "lora": False, "num_train_examples": 8192}

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        f = ctx.forget
        logits = run_forward(ctx.model, f).logits
        token = losses.token_logprobs(logits, f.input_ids, f.mask)
        logp, lengths = losses.sequence_logprob(token, f.mask)
        return {
            "forget": losses.simnpo_loss(logp, lengths, self.cfg.beta, self.cfg.gamma),
            "retain": self.retain(ctx),
        }
