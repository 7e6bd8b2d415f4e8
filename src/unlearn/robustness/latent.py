"""Latent-space attack: a universal perturbation of the residual stream, optimised with the
model's weights frozen to make forget-domain text likely again, then kept in place while the
held-out forget questions and the retain tasks are scored.

Che et al. 2025, "Model Tampering Attacks Enable More Rigorous Evaluations of LLM Capabilities"
(arXiv 2502.05209), find latent-space attacks among the strongest tampering attacks on unlearned
models: output-level forgetting often leaves the knowledge reachable by a small push of the
hidden states. The perturbation and its optimiser follow the latent adversarial training
attacks they build on (Sheshadri et al. 2024, arXiv 2407.15549): projected gradient descent on
an L2 ball.

Design choices:
- Universal, per layer: one vector d_l per attacked block, added to block l's output at every
  position of every input, h_l <- h_l + d_l. A perturbation fitted per input cannot be applied
  to an unseen question; one vector per layer can, and it is what an adversary would ship. A
  few trainable soft-prompt embeddings would be universal too, but they lengthen every prompt
  (the mini world's models saw 64-token rows: the in-context probe shows longer inputs alone
  break them) and need an embedding path through the scorer; a residual vector changes nothing
  the scorer sees.
- The bound is an L2 norm per token, |d_l| <= eps_l (the same vector at every token, so its
  norm is its norm at each token), with eps_l = `radius` x the median L2 norm of block l's
  output over the attack documents' tokens, measured once without the perturbation: a radius
  means the same on models whose residual norms differ by orders of magnitude. The median, not
  the mean: a few tokens of a large model carry norms hundreds of times the rest.
- The objective is the ordinary next-token cross-entropy (`losses.lm_ce`) on forget-domain
  documents of the attack group (the documents the forget fine-tuning attack trains on), in
  batches of `pdbs` documents drawn by `ExampleStream` (deterministic per seed).
- PGD step: d_l <- project(d_l - a_t eps_l g_l / |g_l|), a normalised gradient step whose length
  is a fraction a_t of the bound, decayed linearly from `lr` to 0 over the steps so that the
  last iterates settle instead of circling the optimum, then projected back onto the ball.
- The weights are frozen for the attack (requires_grad off, restored afterwards) and the model
  is in eval mode; the perturbation exists only inside `add_to_block_outputs`, whose hooks are
  removed when the context ends, also when it raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from unlearn.data.batching import Batch, ExampleStream, collate, tokenize_examples
from unlearn.models.modes import eval_mode
from unlearn.readouts.hooks import capture, get_blocks, num_layers
from unlearn.robustness.suite import LatentAttack
from unlearn.training.losses import lm_ce

LOSS_DOCS = 256
"""Attack documents the loss before and after the attack is measured on (the first ones)."""


def default_layers(n: int) -> list[int]:
    """The blocks a `LatentAttack` without `layers` perturbs: those at 1/4, 1/2 and 3/4 of the
    depth (distinct), where the residual stream still holds what later blocks read out."""
    return sorted({min(n - 1, (n * k) // 4) for k in (1, 2, 3)})


def attack_layers(settings: LatentAttack, n: int) -> list[int]:
    """The attacked blocks of a model with `n` blocks (ValueError for one outside it)."""
    layers = list(settings.layers) if settings.layers is not None else default_layers(n)
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise ValueError(f"latent layers {bad} outside the model's blocks 0..{n - 1}")
    return sorted(set(layers))


@contextlib.contextmanager
def add_to_block_outputs(model: nn.Module, deltas: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Add deltas[l] (a [hidden] vector) to the output of block l at every position, for
    forwards inside the context; gradients flow into the deltas. The hooks are removed when the
    context ends, whatever happens inside it."""
    blocks = get_blocks(model)
    for layer in deltas:
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} outside the model's blocks 0..{len(blocks) - 1}")

    def make_hook(delta: torch.Tensor):
        def hook(_mod: nn.Module, _inp: object, output: object) -> object:
            # transformers >= 5 returns a tensor from decoder layers, older versions a tuple.
            h = output[0] if isinstance(output, tuple) else output
            shifted = h + delta.to(device=h.device, dtype=h.dtype)
            return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

        return hook

    handles = []
    try:
        for layer, delta in deltas.items():
            handles.append(blocks[layer].register_forward_hook(make_hook(delta)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Every parameter with requires_grad off inside the context (only the perturbation is
    optimised; no weight gradient is computed or kept), as found afterwards."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


@dataclass
class LatentResult:
    """The optimised perturbation and what it did to the loss it attacks."""

    deltas: dict[int, torch.Tensor]
    """Layer -> the [hidden] vector added to that block's output (detached)."""
    bounds: dict[int, float]
    """Layer -> eps_l, the L2 bound of its vector."""
    hidden_norms: dict[int, float]
    """Layer -> the median per-token L2 norm of the block's output the bound is scaled by."""
    loss_before: float
    """Mean LM loss on the attack documents (the first LOSS_DOCS) without the perturbation."""
    loss_after: float
    """The same with the optimised perturbation."""
    losses: list[float] = field(default_factory=list)
    """The training batch loss at each step (before that step's update)."""

    def summary(self) -> dict:
        """JSON-able: layers, bounds, norms, losses (the vectors themselves are not kept)."""
        return {
            "layers": sorted(self.deltas),
            "bounds": {str(k): v for k, v in self.bounds.items()},
            "delta_norms": {str(k): float(d.norm()) for k, d in self.deltas.items()},
            "hidden_norms": {str(k): v for k, v in self.hidden_norms.items()},
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
        }


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _fixed_batches(examples: Sequence[Sequence[int]], size: int, pad: int) -> list[Batch]:
    head = list(examples[:LOSS_DOCS])
    return [collate(head[i : i + size], pad) for i in range(0, len(head), size)]


@torch.no_grad()
def mean_loss(
    model: nn.Module, batches: Sequence[Batch], deltas: Mapping[int, torch.Tensor] | None = None
) -> float:
    """The LM loss over `batches` (token-weighted mean of the batches' masked means), with
    `deltas` added to the block outputs (None: the model as it is)."""
    device = _device(model)
    total, weight = 0.0, 0
    with add_to_block_outputs(model, deltas or {}):
        for b in batches:
            b = b.to(device)
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                           use_cache=False).logits  # fmt: skip
            pairs = int((b.mask[:, :-1] & b.mask[:, 1:]).sum())
            total += float(lm_ce(logits, b.input_ids, b.mask)) * pairs
            weight += pairs
    if weight == 0:
        raise ValueError("the attack documents have no token pair to score")
    return total / weight


@torch.no_grad()
def _median_norms(
    model: nn.Module, batches: Sequence[Batch], layers: list[int]
) -> tuple[dict[int, float], int]:
    """({layer: median per-token L2 norm of the block's output}, the residual width)."""
    device = _device(model)
    norms: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    width = 0
    with capture(model, layers, detach=True) as out:
        for b in batches:
            b = b.to(device)
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            for layer in layers:
                norms[layer].append(out[layer].float().norm(dim=-1)[b.mask].cpu())
                width = out[layer].shape[-1]
    return {layer: float(torch.cat(v).median()) for layer, v in norms.items()}, width


def latent_attack(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    settings: LatentAttack,
    seed: int = 0,
) -> LatentResult:
    """Optimise the universal perturbation of `settings` on `texts` (module docstring). The
    model's weights and modes are left as found; the perturbation is returned, not applied."""
    layers = attack_layers(settings, num_layers(model))
    docs = [t for t in texts if t.strip()]
    if settings.num_examples is not None:
        docs = docs[: settings.num_examples]
    examples = tokenize_examples(docs, tokenizer, settings.max_length)
    if not examples:
        raise ValueError("the latent attack has no forget-domain document to optimise on")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = ExampleStream(examples, settings.pdbs, pad, seed)
    fixed = _fixed_batches(examples, settings.pdbs, pad)
    device = _device(model)
    with eval_mode(model), frozen_weights(model):
        norms, width = _median_norms(model, fixed, layers)
        bounds = {layer: settings.radius * norms[layer] for layer in layers}
        deltas = {layer: torch.zeros(width, device=device, requires_grad=True) for layer in layers}
        before = mean_loss(model, fixed)
        losses = []
        for step in range(settings.steps):
            b = stream.batch(step).to(device)
            with add_to_block_outputs(model, deltas):
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                               use_cache=False).logits  # fmt: skip
                loss = lm_ce(logits, b.input_ids, b.mask)
            grads = torch.autograd.grad(loss, list(deltas.values()))
            losses.append(loss.item())
            rate = settings.lr * (1 - step / settings.steps)
            with torch.no_grad():
                for (layer, delta), grad in zip(deltas.items(), grads, strict=True):
                    delta -= rate * bounds[layer] * grad / grad.norm().clamp_min(1e-12)
                    # Projection onto the L2 ball of radius eps_l (no branch: no device sync).
                    delta *= (bounds[layer] / delta.norm().clamp_min(1e-12)).clamp(max=1.0)
        final = {layer: d.detach() for layer, d in deltas.items()}
        after = mean_loss(model, fixed, final)
    return LatentResult(final, bounds, norms, before, after, losses)
