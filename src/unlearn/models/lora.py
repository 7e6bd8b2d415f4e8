"""LoRA: which modules of a model can carry adapters (checked from the config alone, before any
weights load) and attaching them with peft.
"""

from __future__ import annotations

import functools

import torch

from unlearn.errors import UsageError
from unlearn.models.refs import ModelRef, meta_model_or_note

LORA_ALL_LINEAR = "all-linear"
"""peft's name for every linear layer of the blocks (the default `--lora_target_modules`)."""


@functools.lru_cache(maxsize=16)
def module_kinds(ref: ModelRef) -> dict[str, type] | None:
    """{module name: module class} of the model, built on the meta device from its config alone
    (`refs.meta_model`); None when the model cannot be built that way (some remote code makes
    real tensors in its constructor)."""
    model = meta_model_or_note(ref, "--lora_target_modules is checked when the model loads")
    if model is None:
        return None
    return {name: type(module) for name, module in model.named_modules() if name}


def _lora_supported(kind: type) -> bool:
    """Module classes peft's LoRA can wrap (the ones a causal LM's target modules use)."""
    from transformers.pytorch_utils import Conv1D

    plain = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    return issubclass(kind, plain)


def check_lora_targets(model_ref: ModelRef, modules: list[str]) -> None:
    """UsageError unless every `--lora_target_modules` entry names modules of the model that LoRA
    can wrap, matched as peft matches them (a module's full name, or a dotted suffix of it).

    peft finds a bad name only after the weights loaded (and ignores a name that matches nothing
    when another one matches), so a typo would cost a model load or silently adapt fewer layers.
    """
    if list(modules) == [LORA_ALL_LINEAR]:
        return
    if not modules:
        raise UsageError("--lora_target_modules is empty (all-linear adapts every linear layer)")
    if LORA_ALL_LINEAR in modules:
        raise UsageError(f"--lora_target_modules: {LORA_ALL_LINEAR} cannot be combined with names")
    kinds = module_kinds(model_ref)
    if kinds is None:
        return
    supported = {name for name, kind in kinds.items() if _lora_supported(kind)}
    leaves = sorted({name.rsplit(".", 1)[-1] for name in supported})
    for target in modules:
        matched = {
            name: kind
            for name, kind in kinds.items()
            if name == target or name.endswith(f".{target}")
        }
        if not matched:
            raise UsageError(
                f"--lora_target_modules: {model_ref} has no module named {target!r}"
                f" (modules LoRA can adapt: {', '.join(leaves)}; or all-linear)"
            )
        unsupported = sorted({k.__name__ for name, k in matched.items() if name not in supported})
        if unsupported:
            raise UsageError(
                f"--lora_target_modules: {target!r} names {'/'.join(unsupported)} modules, which"
                f" LoRA cannot adapt (it can: {', '.join(leaves)}; or all-linear)"
            )


def attach_lora(model: torch.nn.Module, settings) -> torch.nn.Module:
    """Wrap `model` with fresh LoRA adapters (peft); only adapter weights are trainable."""
    from peft import LoraConfig, get_peft_model

    targets = settings.lora_target_modules
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=LORA_ALL_LINEAR if targets == [LORA_ALL_LINEAR] else targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
