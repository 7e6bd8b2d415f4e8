"""Activation capture and substitution at transformer block outputs.

One definition of "layer l" for the whole project: the output of block l (0-based). For every
block but the last this equals `hidden_states[l + 1]` of an HF forward with
`output_hidden_states=True`; for the last block HF reports the output *after* the final norm,
so we never read `hidden_states` and always hook the block itself. Lenses, affine maps and every
loss use these hooks, so fitting and applying can never disagree by a layer.

Hooks exist only inside context managers that always remove them, even when the forward raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

_BLOCK_LIST_NAMES = ("layers", "h", "blocks", "layer")


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the transformer block list of any HF causal LM (also through PEFT/DDP/FSDP wrappers).

    Found generically rather than by a per-family attribute: the largest `nn.ModuleList` whose
    attribute name is a usual block-list name (GPT-NeoX `gpt_neox.layers`, Llama `model.layers`,
    GPT-2 `transformer.h`, ...).
    """
    best: nn.ModuleList | None = None
    for name, module in model.named_modules():
        is_block_list = name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES
        if (
            isinstance(module, nn.ModuleList)
            and is_block_list
            and (best is None or len(module) > len(best))
        ):
            best = module
    if best is None:
        raise ValueError(f"no transformer block list found in {type(model).__name__}")
    return best


def num_layers(model: nn.Module) -> int:
    return len(get_blocks(model))


def _block_output(output: object) -> torch.Tensor:
    # transformers >= 5 returns a tensor from decoder layers; older versions return a tuple.
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index,return-value]


class _StopForward(Exception):
    """Raised by a hook to end a forward once every requested layer has been captured."""


@contextlib.contextmanager
def capture(
    model: nn.Module, layers: Sequence[int], detach: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output of each block in `layers` during forwards inside the context.

    Yields a dict {layer: tensor [batch, seq, hidden]} that is filled (overwritten) by each forward.
    Gradients flow through the captured tensors unless `detach` is set.
    """
    blocks = get_blocks(model)
    out: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer in layers:

            def hook(_mod: nn.Module, _inp: object, output: object, layer: int = layer) -> None:
                h = _block_output(output)
                out[layer] = h.detach() if detach else h

            handles.append(blocks[layer].register_forward_hook(hook))
        yield out
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replace_output(model: nn.Module, layer: int, value: torch.Tensor) -> Iterator[None]:
    """Make block `layer` output `value` instead of what it computed, for forwards in the context.

    Used by the sequential method: the current model's h_L is pushed through the frozen model's
    upper blocks, and gradients flow back into `value`.
    """
    block = get_blocks(model)[layer]

    def hook(_mod: nn.Module, _inp: object, output: object) -> object:
        if isinstance(output, tuple):
            return (value, *output[1:])
        return value

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def forward_hiddens(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: Sequence[int],
    stop_early: bool = True,
) -> dict[int, torch.Tensor]:
    """Block outputs at `layers` for one batch, stopping the forward after the last needed block.

    Stopping early saves the upper blocks and the unembedding when only activations are needed
    (source-checkpoint activations, affine fitting).
    """
    blocks = get_blocks(model)
    last = max(layers)
    with capture(model, layers) as out:
        stopper = None
        if stop_early:

            def stop(_mod: nn.Module, _inp: object, _out: object) -> None:
                raise _StopForward

            stopper = blocks[last].register_forward_hook(stop)
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            if stopper is not None:
                stopper.remove()
        return dict(out)
