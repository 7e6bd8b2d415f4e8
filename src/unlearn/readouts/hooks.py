"""Activation capture and substitution at transformer block outputs.

One definition of "layer l" for the whole project: the output of block l (0-based). For every
block but the last this equals `hidden_states[l + 1]` of an HF forward with
`output_hidden_states=True`; for the last block HF reports the output *after* the final norm,
so we never read `hidden_states` and always hook the block itself. Lenses, affine maps and every
loss use these hooks, so fitting and applying can never disagree by a layer.

Hooks (and `run_above`'s temporary block forwards) exist only inside context managers that
always remove them, even when the forward raises.

Lookups run several times per micro-batch, so what they find by walking every module (the block
list, the final norm) is remembered per model object, as a path that is resolved again on each
call: cheap, and a model whose modules were replaced since is searched afresh.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

_BLOCK_LIST_NAMES = ("layers", "h", "blocks", "layer")

_PATHS: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()
"""Per model object (a PEFT/DDP wrapper is another object, with its own entry): {what: the
dotted path of the submodule found for it}."""


def cached_submodule(
    model: nn.Module, what: str, find: Callable[[nn.Module], str], kind: type = nn.Module
) -> nn.Module:
    """The submodule at the path `find(model)` returns, searched once per model object.

    `what` names the lookup. The remembered path is resolved on every call and the result must
    still be a `kind`, else the model is searched again (a block list replaced by another
    module, say); wrapping a model later (PEFT, DDP, FSDP2) keeps the wrapped object's entry
    valid, since its own modules stay where they were (FSDP2 changes their classes, not paths).
    """
    paths = _PATHS.setdefault(model, {})
    path = paths.get(what)
    if path is not None:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            found = None
        if isinstance(found, kind):
            return found
    paths[what] = path = find(model)
    return model.get_submodule(path)


def _block_list_path(model: nn.Module) -> str:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        is_block_list = name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES
        if (
            isinstance(module, nn.ModuleList)
            and is_block_list
            and (best is None or len(module) > len(best[1]))
        ):
            best = (name, module)
    if best is None:
        raise ValueError(f"no transformer block list found in {type(model).__name__}")
    return best[0]


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the transformer block list of any HF causal LM (also through PEFT/DDP/FSDP wrappers).

    Found generically rather than by a per-family attribute: the largest `nn.ModuleList` whose
    attribute name is a usual block-list name (GPT-NeoX `gpt_neox.layers`, Llama `model.layers`,
    GPT-2 `transformer.h`, ...). Searched once per model object (`cached_submodule`).
    """
    return cached_submodule(model, "blocks", _block_list_path, nn.ModuleList)  # type: ignore[return-value]


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


_UNSET = object()
_RETURNS_TUPLE: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()
"""Per block class: whether its forward returns a tuple (older transformers) or a tensor."""


@contextlib.contextmanager
def run_above(model: nn.Module, layer: int, value: torch.Tensor) -> Iterator[None]:
    """Forwards in the context run only the blocks above `layer`, from `value` as its output.

    Same result as `replace_output(model, layer, value)` without computing blocks 0..layer, whose
    work that substitution throws away: block `layer` returns `value` and the blocks below pass
    their input through (their forwards are replaced for the context). The embeddings, the
    attention mask and the rotary position embeddings are computed outside the blocks, as in a
    full forward, so the blocks above get the same inputs; gradients flow back into `value`.
    Hooks on the skipped blocks see the passed-through values. For forwards without a KV cache
    or attention outputs (`use_cache=False`), as every method runs them.
    """
    blocks = get_blocks(model)
    if not 0 <= layer < len(blocks):
        raise IndexError(f"layer {layer} outside the model's blocks 0..{len(blocks) - 1}")
    saved: list[tuple[nn.Module, object]] = []
    try:
        for i in range(layer + 1):
            block = blocks[i]
            # An instance-level forward (set by accelerate hooks, say) is restored as it was.
            saved.append((block, block.__dict__.get("forward", _UNSET)))
            block.forward = _pass_through(block, value if i == layer else None)
        yield
    finally:
        for block, forward in reversed(saved):  # reversed: a block listed twice ends as found
            if forward is _UNSET:
                del block.forward
            else:
                block.forward = forward


def _pass_through(block: nn.Module, value: torch.Tensor | None) -> Callable[..., object]:
    """A forward for `block` that returns `value`, or its input hidden states when None, in the
    block's own output format."""
    compute = block.forward

    def forward(*args: object, **kwargs: object) -> object:
        hidden = value if value is not None else _hidden_input(args, kwargs)
        return (hidden,) if _returns_tuple(block, compute, args, kwargs) else hidden

    return forward


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise TypeError("a block was called without hidden states as its first argument")
    return hidden


def _returns_tuple(
    block: nn.Module, compute: Callable[..., object], args: tuple, kwargs: dict
) -> bool:
    """Whether `block` returns a tuple: decoder layers return a tensor in transformers >= 5 and
    a tuple before (per model family, and remote code may do either), so the first call of a
    block class runs it once (no grad) and looks."""
    kind = type(block)
    if kind not in _RETURNS_TUPLE:
        with torch.no_grad():
            out = compute(*args, **kwargs)
        if isinstance(out, tuple) and len(out) != 1:
            # The model reads a cache or attention weights from the extra outputs.
            raise ValueError(
                f"{kind.__name__} returns {len(out)} outputs: run_above needs use_cache=False"
                " and no attention outputs"
            )
        _RETURNS_TUPLE[kind] = isinstance(out, tuple)
    return _RETURNS_TUPLE[kind]


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


@contextlib.contextmanager
def project_out(model: nn.Module, directions: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Remove one direction from the output of each block in `directions`, for forwards in the
    context: block l outputs h - (h . u) u, u = directions[l] / |directions[l]|.

    Directional ablation (the robustness suite's `ablation` probe): if unlearning hid knowledge
    behind one direction of the residual stream, taking that direction out everywhere at once
    may bring it back. A direction is normalised here, so any mean difference can be passed as
    it is; a zero one cannot name a direction and is a ValueError, as is a layer outside the
    blocks. Each layer's projection is applied to its own block's output, so the blocks above
    see (and may re-add) it, as the hooks of `capture` see it.
    """
    blocks = get_blocks(model)
    units: dict[int, torch.Tensor] = {}
    for layer, direction in directions.items():
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} outside the model's blocks 0..{len(blocks) - 1}")
        norm = direction.detach().float().norm()
        if direction.ndim != 1 or not torch.isfinite(norm) or norm == 0:
            raise ValueError(f"the direction for layer {layer} is not a non-zero finite vector")
        units[layer] = direction.detach().float() / norm

    def make_hook(unit: torch.Tensor) -> Callable[..., object]:
        def hook(_mod: nn.Module, _inp: object, output: object) -> object:
            h = _block_output(output)
            u = unit.to(device=h.device, dtype=h.dtype)
            projected = h - (h @ u)[..., None] * u
            return (projected, *output[1:]) if isinstance(output, tuple) else projected

        return hook

    handles = []
    try:
        for layer, unit in units.items():
            handles.append(blocks[layer].register_forward_hook(make_hook(unit)))
        yield
    finally:
        for handle in handles:
            handle.remove()
