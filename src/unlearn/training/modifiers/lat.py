"""Targeted latent adversarial training (LAT; Sheshadri et al. 2024, "Latent Adversarial Training
Improves Robustness to Persistent Harmful Behaviors in LLMs", arXiv 2407.15549).

Per micro-batch an adversary perturbs the residual stream, the outputs of the blocks in
`--lat_layers`, to make the forget text likely again:

    δ* ≈ argmin_{‖δ_t‖₂ ≤ ε for every token t}  CE_LM(θ, forget | h_l ← h_l + δ_l)

found by `--lat_steps` steps of projected gradient descent from δ = 0: each step moves every
token's δ by α = 2.5·ε/steps along its own normalised gradient (Madry et al.'s rule: enough to
reach the ball's surface and move along it) and projects it back into the ball of radius ε
(`--lat_eps`). The method's terms are then computed with δ* (detached) in place, so its forget
term is minimised against the latent state an attacker would look for: knowledge that a small
push in activation space brings back is what a fine-tuning attack recovers cheaply.

The adversary never moves weights: its gradients are taken with respect to δ only
(`torch.autograd.grad`), so no parameter gradient is accumulated by its steps. The perturbation
applies only to forwards of the trained model on the forget batch (the ids tensor of
ctx.forget): never to the retain batch, and never to the frozen original, which with LoRA is
the same module with its adapters disabled (`Reference.active`). Padding positions are not
perturbed. Hooks exist only inside `perturbing`'s context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from unlearn.methods.base import StepContext, run_forward
from unlearn.readouts.hooks import _block_output, get_blocks
from unlearn.training import losses
from unlearn.training.modifiers.micro import MicroBatch

STEP_FACTOR = 2.5
"""PGD step size as a multiple of ε / steps."""


def default_lat_layers(n_layers: int) -> list[int]:
    """One block an eighth of the way up (4 of 32, 0 of 3): below the first block every
    method's forget term reads by default (rmu's 7 of 32, lens's 5), since a forget forward
    that stops below a perturbed block never sees its perturbation."""
    return [min(n_layers - 1, round(n_layers / 8))]


def _same_ids(given: object, ids: torch.Tensor) -> bool:
    # The same storage and shape: a model may pass its input ids on as a view.
    return (
        isinstance(given, torch.Tensor)
        and given.data_ptr() == ids.data_ptr()
        and given.shape == ids.shape
    )


@contextlib.contextmanager
def perturbing(ctx: StepContext, deltas: Mapping[int, torch.Tensor]) -> Iterator[set[int]]:
    """Forwards of `ctx.model` on `ctx.forget` inside the context add `deltas[l]` ([batch, seq,
    hidden]) to the output of block l; every other forward is untouched.

    Yields the set of layers a perturbation was added at (filled as forwards run). A forward
    pre-hook on the model arms the block hooks when its input ids are the forget batch's and
    no `Reference.use` context is open; a forward hook that also runs when the forward raises
    (an early-stopped forward) disarms them."""
    model: nn.Module = ctx.model
    ids = ctx.forget.input_ids
    reference = ctx.reference
    blocks = get_blocks(model)
    armed = [False]
    reached: set[int] = set()

    def arm(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        given = kwargs.get("input_ids", args[0] if args else None)
        original = reference is not None and reference.active > 0
        armed[0] = not original and _same_ids(given, ids)

    def disarm(_mod: nn.Module, _args: tuple, _output: object) -> None:
        armed[0] = False

    def adder(layer: int):
        def hook(_mod: nn.Module, _inp: object, output: object) -> object:
            if not armed[0]:
                return None
            h = _block_output(output)
            reached.add(layer)
            moved = h + deltas[layer].to(h.dtype)
            return (moved, *output[1:]) if isinstance(output, tuple) else moved

        return hook

    handles = []
    try:
        handles.append(model.register_forward_pre_hook(arm, with_kwargs=True))
        handles.append(model.register_forward_hook(disarm, always_call=True))
        for layer in deltas:
            handles.append(blocks[layer].register_forward_hook(adder(layer)))
        yield reached
    finally:
        for handle in handles:
            handle.remove()


def project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """`delta` with every token's vector ([..., hidden]) scaled into the L2 ball of radius eps."""
    norms = delta.norm(dim=-1, keepdim=True)
    return delta * (eps / norms.clamp_min(eps))


def adversary(
    ctx: StepContext, mb: MicroBatch, layers: Sequence[int], eps: float, steps: int
) -> dict[int, torch.Tensor]:
    """The perturbations {layer: δ [batch, seq, hidden], float32, detached} that `steps` PGD
    steps find to lower the LM loss on ctx.forget; no parameter gradient is touched."""
    f = ctx.forget
    keep = f.mask.unsqueeze(-1).float()  # padding stays unperturbed
    shape = (*f.input_ids.shape, ctx.model.config.hidden_size)
    device = f.input_ids.device
    deltas = {layer: torch.zeros(shape, device=device) for layer in layers}
    alpha = STEP_FACTOR * eps / steps
    for _ in range(steps):
        leaves = {layer: d.requires_grad_(True) for layer, d in deltas.items()}
        with perturbing(ctx, leaves), mb.precision.autocast():
            logits = run_forward(ctx.model, f).logits
            loss = losses.lm_ce(logits, f.input_ids, f.mask)
        grads = torch.autograd.grad(mb.scaled(loss), list(leaves.values()), allow_unused=True)
        with torch.no_grad():
            for (layer, d), g in zip(leaves.items(), grads, strict=True):
                if g is None:  # this block does not reach the loss: nothing to move
                    deltas[layer] = d.detach()
                    continue
                # An fp16 overflow must not poison δ: such a token just does not move.
                g = torch.nan_to_num(g.float(), nan=0.0, posinf=0.0, neginf=0.0)
                unit = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                deltas[layer] = project(d.detach() - alpha * unit, eps) * keep
    return deltas
