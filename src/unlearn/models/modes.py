"""Cheap switches of how a loaded model computes (eval mode, LoRA adapters off), each a context
manager that puts back what it found, also when its block raises.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode (no dropout, LoRA dropout included) inside the block, and every
    module back in the mode it was in afterwards, also when the block raises: evaluating or
    fitting in the middle of training must not leave dropout off for the steps that follow.

    The reference model enters it once or twice per micro-batch, so it flips the `training` flag
    of the modules that are training and only those, instead of `train()`'s recursion over every
    module (about ten times slower). A module whose class gives `train()` side effects (DoRA
    clears a cache, transformers re-selects hub kernels) makes it go through `train()` itself.
    """
    modules = _submodules(model)
    overriding = [m for m in modules if type(m).train is not torch.nn.Module.train]
    if not all(_plain_train(m) for m in overriding):
        flags = [(m, m.training) for m in modules]  # modules[0] is model
        model.eval()
        try:
            yield model
        finally:
            model.train(flags[0][1])
            for m, flag in flags:  # train() set the root's mode everywhere; some had their own
                if m.training != flag:
                    _set_plain(m, "training", flag)
        return
    training = [m for m in modules if m.training]
    for m in training:
        _set_plain(m, "training", False)
    try:
        yield model
    finally:
        for m in training:
            _set_plain(m, "training", True)


def _submodules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """`model` and every module under it, once each (as `modules()`, without building every
    module's dotted name, which costs more than the walk)."""
    seen: set[int] = set()
    out: list[torch.nn.Module] = []
    stack: list[torch.nn.Module | None] = [model]
    while stack:
        module = stack.pop()
        if module is not None and id(module) not in seen:  # a child slot may hold None
            seen.add(id(module))
            out.append(module)
            stack.extend(module._modules.values())
    return out


def _plain_train(module: torch.nn.Module) -> bool:
    """Whether switching `module`'s mode only sets its flag although its class overrides
    `train()`: transformers' override does more only with hub kernels (`use_kernels`)."""
    from transformers import PreTrainedModel

    return type(module).train is PreTrainedModel.train and not getattr(module, "use_kernels", False)


def _set_plain(module: torch.nn.Module, name: str, value: object) -> None:
    """Set a plain attribute of `module`: what nn.Module's own __setattr__ ends in for a value
    that is no parameter, buffer or module, without its checks for those, which cost ten times
    the assignment."""
    object.__setattr__(module, name, value)


_UNSET = object()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The PEFT model `model` computing as its base model (every adapter layer off) inside the
    block, and each layer back in its previous state afterwards, also when the block raises.

    What peft's `disable_adapter()` does for LoRA-like adapters, without its costs and side
    effects: it walks every module twice and formats each adapter layer's repr
    (`get_model_status`), ~5 ms per call on the mini world's model, once or twice per
    micro-batch; and it turns requires_grad off on every adapter inside and back on for every
    active adapter on exit, undoing any freezing done since. This sets only the flag the adapter
    layers' forward reads (`_disable_adapters`) and the PEFT model's own `_adapters_disabled`,
    and never changes requires_grad. Prompt-learning adapters have no such layers: for them
    peft's own context is used.
    """
    config = model.peft_config[model.active_adapter]
    if config.is_prompt_learning or config.is_adaption_prompt:
        with model.disable_adapter():
            yield model
        return
    tuner_layers = _tuner_layer_types()
    flags = [
        (m, "_disable_adapters") for m in _submodules(model) if isinstance(m, tuner_layers)
    ] + [(model, "_adapters_disabled")]
    # The instance's own value (or _UNSET where the class default applies), restored as found.
    saved = [(m, name, m.__dict__.get(name, _UNSET)) for m, name in flags]
    try:
        for m, name in flags:
            _set_plain(m, name, True)
        yield model
    finally:
        for m, name, value in saved:
            if value is _UNSET:
                m.__dict__.pop(name, None)
            else:
                _set_plain(m, name, value)


@functools.cache
def _tuner_layer_types() -> tuple[type, ...]:
    """peft's classes whose forward skips the adapter when `_disable_adapters` is set (what
    its `enable_adapters(False)` sets): adapter layers and wrapped modules_to_save."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    return (BaseTunerLayer, AuxiliaryTrainingWrapper)
