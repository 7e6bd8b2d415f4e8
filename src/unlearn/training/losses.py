"""Shared loss terms of the unlearning methods: pure functions of tensors, no model access.

Design choices, shared by every term so that coefficients mean the same thing across methods:

- Every average is a *masked token mean*: the sum over valid (non-pad) tokens divided by the
  number of valid tokens in the batch. Never a mean over padded positions (which would shrink a
  term as padding grows) and never a per-sequence sum (which would scale it with length).
- Masks are `[batch, seq]`, bool or 0/1. Padded positions are excluded with `torch.where`, not by
  multiplying with the mask, so even a non-finite value at a pad position cannot leak into the
  result.
- Terms are computed in float32 whatever the activation dtype (a bf16 log-softmax over a large
  vocabulary loses the small probabilities that KL and CE depend on) and returned as float32
  scalars.
- Frozen inputs (reference logits and hiddens, transfer targets) are detached here, so a caller
  can never train the reference by accident.
- An all-padding batch is a data bug, not a zero loss: `masked_mean` raises on it.

Units: the two forget CE terms are in units of log V (the uniform distribution scores 1); KL and
LM CE are nats per token; the L2 retain term is in activation units per token; activation MSE is
squared activation units per token and hidden dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _bool_mask(mask: Tensor, shape: torch.Size) -> Tensor:
    if mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match values {tuple(shape)}")
    return mask != 0


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` [B, T] over the positions where `mask` [B, T] is set (float32 scalar)."""
    valid = _bool_mask(mask, values.shape)
    count = valid.sum()
    if not bool(count > 0):
        raise ValueError("masked mean over a batch with no valid tokens")
    total = torch.where(valid, values.float(), torch.zeros((), device=values.device)).sum()
    return total / count


def random_target_ce(
    logits: Tensor, mask: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Forget term: cross-entropy against uniformly random token ids, divided by log V.

    The reference campaign's random-target forget loss (used by the tuned-lens and sequential
    unlearning methods): each valid position gets an independent target drawn uniformly from the
    vocabulary, so the expected loss is minimised by the uniform distribution, where it equals 1 (in
    units of log V). It is a one-sample estimate of `max_entropy`. Every valid position gets a
    target, whichever token it would predict. `generator` makes the draw reproducible; it may live
    on another device than `logits` (the ids are moved).
    """
    batch, seq, vocab = logits.shape
    device = generator.device if generator is not None else logits.device
    targets = torch.randint(vocab, (batch, seq), generator=generator, device=device)
    ce = F.cross_entropy(
        logits.float().reshape(-1, vocab), targets.to(logits.device).reshape(-1), reduction="none"
    )
    return masked_mean(ce.view(batch, seq), mask) / math.log(vocab)


def max_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Forget term: exact cross-entropy from the uniform distribution, divided by log V.

    The noise-free form of `random_target_ce` (its expectation over the random targets):
    `(logsumexp(z) - mean_v(z)) / log V` per valid token, masked token mean. Since
    CE(uniform, p) = log V + KL(uniform || p), it is at least 1 and equals 1 exactly when the
    predicted distribution is uniform.
    """
    vocab = logits.shape[-1]
    z = logits.float()
    per_token = torch.logsumexp(z, dim=-1) - z.mean(dim=-1)
    return masked_mean(per_token, mask) / math.log(vocab)


def kl_retain(ref_logits: Tensor, cur_logits: Tensor, mask: Tensor) -> Tensor:
    """Retain term: KL(p_ref || p_cur) in nats, summed over the vocabulary, masked token mean.

    The forward KL to the frozen reference's next-token distribution on retain data (the reference
    campaign's default retain loss for checkpoint transfer; an option elsewhere). Both distributions
    come from float32 log-softmax, so no probability is exponentiated and logged again.
    """
    if ref_logits.shape != cur_logits.shape:
        raise ValueError(
            f"reference logits {tuple(ref_logits.shape)} and current logits "
            f"{tuple(cur_logits.shape)} differ in shape"
        )
    ref_logp = F.log_softmax(ref_logits.detach().float(), dim=-1)
    cur_logp = F.log_softmax(cur_logits.float(), dim=-1)
    per_token = (ref_logp.exp() * (ref_logp - cur_logp)).sum(dim=-1)
    return masked_mean(per_token, mask)


def _check_layers(a: Sequence[Tensor], b: Sequence[Tensor], what: str) -> None:
    if len(a) == 0 or len(a) != len(b):
        raise ValueError(f"{what}: need the same non-zero number of layers, got {len(a)}, {len(b)}")


def l2_retain(ref_hiddens: Sequence[Tensor], cur_hiddens: Sequence[Tensor], mask: Tensor) -> Tensor:
    """Retain term: L2 distance to the frozen reference's hidden states, per token.

    For each layer, the Euclidean norm (not its square) of h_cur - h_ref at every valid token,
    masked token mean; then the mean over layers. The norm rather than the squared error follows
    the reference campaign's "L2 norm between hidden states" (used as the default retain loss of
    tuned-lens and sequential unlearning); it grows linearly with drift, so it keeps pulling on
    small deviations where a squared error would fade. Its gradient at zero distance is zero (not
    NaN), so the first step, where the model still equals the reference, is safe.
    """
    _check_layers(ref_hiddens, cur_hiddens, "l2_retain")
    per_layer = []
    for ref, cur in zip(ref_hiddens, cur_hiddens, strict=True):
        dist = torch.linalg.vector_norm(cur.float() - ref.detach().float(), dim=-1)
        per_layer.append(masked_mean(dist, mask))
    return torch.stack(per_layer).mean()


def activation_mse(pred: Sequence[Tensor], target: Sequence[Tensor], mask: Tensor) -> Tensor:
    """Forget term of checkpoint activation transfer: squared error to the transferred activations.

    For each layer, the mean over the hidden dimension of (pred - target)^2 at every valid token,
    masked token mean; then the mean over layers. `target` is A_l(h_l(source)), the affine-mapped
    activations of the early (ignorant) checkpoint, and is detached. The per-dimension mean makes
    the value comparable with the held-out MSE reported by `unlearn.readouts.affine.fit_affine`.
    """
    _check_layers(pred, target, "activation_mse")
    per_layer = []
    for p, t in zip(pred, target, strict=True):
        sq = (p.float() - t.detach().float()).square().mean(dim=-1)
        per_layer.append(masked_mean(sq, mask))
    return torch.stack(per_layer).mean()


def lm_ce(logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Ordinary next-token cross-entropy in nats, masked token mean.

    Logits at position t predict token t+1; a pair counts only when both tokens are valid, so
    neither a prediction from a pad position nor a prediction of a pad token is scored.
    """
    batch, seq, vocab = logits.shape
    if input_ids.shape != (batch, seq):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} do not match logits {(batch, seq)}")
    valid = _bool_mask(mask, input_ids.shape)
    pair_valid = valid[:, :-1] & valid[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab), input_ids[:, 1:].reshape(-1), reduction="none"
    )
    return masked_mean(ce.view(batch, seq - 1), pair_valid)


def token_logprobs(logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
    """log π(token t | tokens < t) at every position t of [B, T] (float32), zero at position 0
    and wherever t or t-1 is padding: the same pairs `lm_ce` scores. Shaped like the input, so
    a frozen model's values can be cached per example (`unlearn.training.frozen_cache`)."""
    batch, seq, _ = logits.shape
    if input_ids.shape != (batch, seq):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} do not match logits {(batch, seq)}")
    valid = _bool_mask(mask, input_ids.shape)
    pair_valid = valid[:, :-1] & valid[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    token = torch.where(pair_valid, token, torch.zeros((), device=token.device))
    return F.pad(token, (1, 0))


def sequence_logprob(token_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence, from `token_logprobs`: the summed log-probability of its tokens given their
    prefix ([B]) and how many tokens were scored ([B]). The preference-style forget terms (NPO,
    SimNPO) compare whole sequences, so this is a per-sequence sum, not a token mean; they
    normalise it themselves (SimNPO by length)."""
    valid = _bool_mask(mask, token_logp.shape)
    counts = (valid[:, :-1] & valid[:, 1:]).sum(dim=1)
    if not bool((counts > 0).all()):
        raise ValueError("a sequence with no scored token (fewer than two valid tokens)")
    return token_logp.float().sum(dim=1), counts


def npo_loss(logp: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
    """Negative preference optimisation (Zhang et al. 2024): (2/β) · mean over sequences of
    log(1 + (π_θ(y|x) / π_ref(y|x))^β) = (2/β) · softplus(β · (log π_θ - log π_ref)). It is
    (2/β)·log 2 where the model equals the reference, falls as the model makes forget sequences
    less likely than the reference does, and its gradient vanishes once they are much less
    likely (bounded below by 0, unlike gradient ascent)."""
    return (2.0 / beta) * F.softplus(beta * (logp.float() - ref_logp.detach().float())).mean()


def simnpo_loss(logp: Tensor, lengths: Tensor, beta: float, gamma: float) -> Tensor:
    """SimNPO (Fan et al. 2024): reference-free and length-normalised,
    -(2/β) · mean log σ(-(β/|y|) · log π_θ(y|x) - γ) = (2/β) · softplus((β/|y|)·log π_θ + γ)."""
    return (2.0 / beta) * F.softplus(beta * logp.float() / lengths.float() + gamma).mean()


def rerouting_loss(
    cur: Sequence[Tensor], orig: Sequence[Tensor], mask: Tensor, orthogonal: bool = False
) -> Tensor:
    """Circuit breakers' rerouting term (Zou et al. 2024): ReLU(cosine(h_θ, h_orig)) per token,
    masked token mean, mean over layers; zero once the representations are orthogonal or
    opposite to the original's. `orthogonal`: |cosine| instead, zero only when orthogonal (an
    opposite representation is as recoverable as the original, by a sign flip)."""
    _check_layers(cur, orig, "rerouting_loss")
    per_layer = []
    for c, o in zip(cur, orig, strict=True):
        cos = F.cosine_similarity(c.float(), o.detach().float(), dim=-1)
        per_layer.append(masked_mean(cos.abs() if orthogonal else F.relu(cos), mask))
    return torch.stack(per_layer).mean()
