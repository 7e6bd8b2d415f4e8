"""Activation (gradient) checkpointing on the trained model: each block's activations are
recomputed in the backward pass instead of kept, through transformers' own implementation.

Non-reentrant checkpointing is used: it supports keyword arguments and forward hooks, and lets
a block's parameters receive gradients whether or not its inputs require them. With LoRA the
base model is frozen, so the embedding output does not require gradients; reentrant
checkpointing would then drop the adapters' gradients and leave them at zero while the loss
looks normal (a known pitfall). `enable_input_require_grads` makes the embedding output require
gradients, which keeps adapters training whichever implementation runs.

transformers checkpoints a block's `forward`, not its call, so the hooks that capture or
replace block outputs (`readouts.hooks`) stay outside the checkpoint and run once; losses and
gradients are unchanged (a test checks every method with and without checkpointing).
"""

from __future__ import annotations

import torch

from unlearn.errors import UsageError
from unlearn.models.refs import ModelRef, meta_model_or_note


def check_gradient_checkpointing(ref: ModelRef) -> None:
    """UsageError, before any weight loads, when the model's class cannot checkpoint."""
    model = meta_model_or_note(ref, "--gradient_checkpointing is checked when the model loads")
    if model is not None and not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"{ref}: {type(model).__name__} does not support --gradient_checkpointing")


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn checkpointing on for a loaded (not yet LoRA-wrapped) model; it applies while the
    model trains and is off in eval mode."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"{type(model).__name__} does not support --gradient_checkpointing")
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.x; the older name is deprecated there
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
