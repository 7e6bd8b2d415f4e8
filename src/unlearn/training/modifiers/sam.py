"""Sharpness-aware unlearning (SAM; Fan et al. 2025, "Towards LLM Unlearning Resilient to
Relearning Attacks: A Sharpness-Aware Minimization Perspective and Beyond", arXiv 2502.05374).

A relearning attack moves the weights a short way in the direction that raises the forget
term; unlearning that holds only at the current weights undoes itself there. SAM minimises the
forget term at the worst nearby point instead:

    min_θ  max_{‖ε‖ ≤ ρ} c_f · forget(θ + ε) + c_r · retain(θ)
    ε ≈ ρ · g / ‖g‖,   g = ∇_θ forget(θ)        (first order; ‖·‖ over every trainable tensor)

Per micro-batch: the terms at θ; g by `torch.autograd.grad` (not accumulated); the other terms'
gradients at θ accumulated as the loop would; the trainable weights moved by ε; the forget
term's gradient there accumulated; the weights copied back from a saved copy (bitwise the
originals: adding and subtracting ε would not be). The update therefore uses
∇forget(θ + ε) + ∇retain(θ). The random targets of a `random_ce` forget term are drawn again
from the same generator state, so both evaluations score the same targets.

The term named "forget" is the one perturbed for; the others are taken at θ. Cost: a second
forward and backward of the forget term and a second forward of the others (their frozen
reference outputs are reused) per micro-batch. Where g is zero or not finite (an fp16
overflow, which the gradient scaler then skips) or the forget coefficient is 0, the step is
the plain one.
"""

from __future__ import annotations

import math

import torch

from unlearn.errors import UsageError
from unlearn.methods.base import StepContext
from unlearn.training.modifiers.micro import MicroBatch


def _norm(g: torch.Tensor) -> torch.Tensor:
    """|g| summed in float32 at least (bf16 gradients would lose the small entries)."""
    return torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).double()


def sam_micro_batch(ctx: StepContext, mb: MicroBatch, rho: float) -> dict[str, torch.Tensor]:
    """Accumulate ∇forget(θ + ε) + ∇(other terms)(θ) for one micro-batch; returns the terms
    as logged: the forget term at θ + ε, the others at θ."""
    generator_state = ctx.generator.get_state() if ctx.generator is not None else None
    terms = mb.terms(ctx)
    forget = terms.get("forget")
    if forget is None:
        raise UsageError(f"--sam_rho needs a forget term; this objective has {sorted(terms)}")
    if mb.weights.get("forget", 0.0) == 0 or not forget.requires_grad:
        mb.backward(terms)
        return terms
    grads = torch.autograd.grad(mb.scaled(forget), mb.params, retain_graph=True, allow_unused=True)
    moved = [(p, g) for p, g in zip(mb.params, grads, strict=True) if g is not None]
    norm = (
        torch.linalg.vector_norm(torch.stack([_norm(g) for _, g in moved])).item() if moved else 0.0
    )
    if norm == 0 or not math.isfinite(norm):
        mb.backward(terms)
        return terms
    others = {n: v for n, v in terms.items() if n != "forget"}
    mb.backward(others)
    logged = {n: v.detach() for n, v in terms.items()}
    del terms, forget, grads, others  # free the graph at θ before the second forward
    params = [p for p, _ in moved]
    originals = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in moved:
                p.add_(g.to(p.dtype), alpha=rho / norm)
        del moved  # the gradients at θ are not needed any more
        if generator_state is not None:
            ctx.generator.set_state(generator_state)  # type: ignore[union-attr]
        forget_there = mb.terms(ctx)["forget"]
        mb.backward({"forget": forget_there})  # before the restore: backward reads the weights
    finally:
        with torch.no_grad():
            for p, original in zip(params, originals, strict=True):
                p.copy_(original)
    logged["forget"] = forget_there.detach()
    return logged
