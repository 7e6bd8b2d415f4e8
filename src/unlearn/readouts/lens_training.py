"""Training a tuned lens on a frozen model.

Training minimises KL(p_final || p_lens_l), a masked token mean over valid tokens, p_final being
the model's own next-token distribution (detached). The model is frozen; one forward per batch
captures every requested layer. The optimizer follows the tuned-lens library's default, which its
authors found to work across model sizes with one setting: SGD with Nesterov momentum 0.9, the
learning rate scaled by (1 - momentum) so that lr = 1 is the usual value, weight decay 1e-3,
gradient-norm clipping at 1, linear decay of the learning rate to zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from unlearn.errors import DivergedError, UsageError
from unlearn.models.modes import eval_mode
from unlearn.readouts.tuned_lens import (
    TunedLens,
    evaluate_lens,
    final_logits_and_hiddens,
    ids_and_mask,
    model_device,
)
from unlearn.training.losses import kl_retain
from unlearn.training.schedules import lr_mult_at


@dataclass
class LensTrainStats:
    """What `train_lens` did and how well the lens fits (KL in nats per token)."""

    layers: list[int]
    steps: int
    """Optimizer steps taken (fewer than asked only when a one-shot batch iterator ran out)."""
    passes: int
    """Passes over `batches` started (more than 1 means the same data was seen again)."""
    first_kl: dict[int, float]
    """KL on the first batch before any step: the identity (logit-lens) KL."""
    last_kl: dict[int, float]
    """Mean KL over the last (up to) 10 training batches."""
    heldout_kl: dict[int, float] | None = None
    heldout_identity_kl: dict[int, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cycle(batches: Iterable[Any], counter: list[int]) -> Iterator[tuple[int | None, Any]]:
    """Iterate `batches` again and again as (key, batch); stop when a pass yields nothing (a
    one-shot iterator). The key is the batch's index when `batches` is a sequence (the same
    batch every pass), else None: a generator's batches cannot be recognised again."""
    keyed = isinstance(batches, Sequence)
    while True:
        counter[0] += 1
        empty = True
        for i, batch in enumerate(batches):
            empty = False
            yield (i if keyed else None), batch
        if empty:
            counter[0] -= 1
            return


FROZEN_FORWARD_BYTES = 1 << 30
"""Memory for the frozen model's outputs (final logits and block outputs) kept while fitting a
lens: the model never changes, so a batch seen again in a later pass reuses its forward instead
of recomputing it (the same numbers, so the same lens). Batches past the budget (a large
vocabulary's logits) are recomputed each pass."""


class _FrozenForwards:
    """The frozen model's outputs per batch key, within a byte budget (see above)."""

    def __init__(self, model: nn.Module, layers: Sequence[int], budget: int) -> None:
        self.model, self.layers, self.budget = model, layers, budget
        self.kept: dict[int, tuple[Tensor, dict[int, Tensor]]] = {}
        self.used = 0

    def __call__(
        self, key: int | None, ids: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[int, Tensor]]:
        if key in self.kept:
            return self.kept[key]
        final, hiddens = final_logits_and_hiddens(self.model, self.layers, ids, mask)
        size = sum(t.numel() * t.element_size() for t in (final, *hiddens.values()))
        if key is not None and self.used + size <= self.budget:
            self.kept[key] = (final, hiddens)
            self.used += size
        return final, hiddens


def _train_step(
    lens: TunedLens,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    frozen: tuple[Tensor, dict[int, Tensor]],
    mask: Tensor,
) -> dict[int, float]:
    """One optimizer step on one batch's frozen outputs; returns each layer's KL before it."""
    final, hiddens = frozen
    opt.zero_grad(set_to_none=True)
    kls = {}
    # One backward per layer keeps a single layer's lens logits alive at a time.
    for layer in lens.layers:
        kl = kl_retain(final, lens.to_logits(model, hiddens[layer], layer), mask)
        if lens.has_translator(layer):
            kl.backward()
        kls[layer] = float(kl.detach())
    torch.nn.utils.clip_grad_norm_(list(lens.parameters()), 1.0)
    opt.step()
    return kls


def train_lens(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Sequence[int],
    steps: int,
    lr: float = 1.0,
    progress: bool = True,
    *,
    heldout: Iterable[Any] | None = None,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
) -> tuple[TunedLens, LensTrainStats]:
    """Fit a tuned lens for `layers` of the frozen `model`, one optimizer step per batch.

    `batches` yields dicts with "input_ids" and optionally "attention_mask" (or `Batch`es); it is
    iterated again from the start when exhausted. If `heldout` is given, the trained and the
    identity lens are both evaluated on it.
    """
    if steps < 1:
        raise UsageError(f"lens training steps must be >= 1, got {steps}")
    if lr <= 0:
        raise UsageError(f"lens learning rate must be > 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise UsageError(f"lens momentum must be in [0, 1), got {momentum}")
    lens = TunedLens.for_model(model, layers)
    params = list(lens.parameters())
    if not params:
        raise UsageError("nothing to train: the last block's lens is the identity by definition")
    # The tuned-lens convention: torch's SGD momentum scales steps by 1 / (1 - momentum).
    base_lr = lr * (1.0 - momentum)
    opt = torch.optim.SGD(
        params, lr=base_lr, momentum=momentum, nesterov=True, weight_decay=weight_decay
    )
    device = model_device(model)
    history: dict[int, list[float]] = {layer: [] for layer in lens.layers}
    frozen = _FrozenForwards(model, lens.layers, FROZEN_FORWARD_BYTES)
    first_kl: dict[int, float] = {}
    passes = [0]
    taken = 0
    with eval_mode(model), tqdm(total=steps, desc="tuned lens", disable=not progress) as bar:
        for step, (key, batch) in zip(range(steps), _cycle(batches, passes), strict=False):
            for group in opt.param_groups:
                group["lr"] = base_lr * lr_mult_at(step, steps, 0, "linear")
            ids, mask = ids_and_mask(batch, device)
            kls = _train_step(lens, model, opt, frozen(key, ids, mask), mask)
            for layer, kl in kls.items():
                history[layer].append(kl)
            if step == 0:
                first_kl = kls
            taken += 1
            bar.update(1)
            bar.set_postfix(kl=f"{sum(h[-1] for h in history.values()) / len(history):.4f}")
    if taken == 0:
        raise UsageError("no training batches for the lens")
    stats = LensTrainStats(
        layers=list(lens.layers),
        steps=taken,
        passes=passes[0],
        first_kl=first_kl,
        last_kl={layer: sum(kls[-10:]) / len(kls[-10:]) for layer, kls in history.items()},
    )
    if not all(math.isfinite(kl) for kl in stats.last_kl.values()):
        raise DivergedError(f"tuned-lens training diverged: final KL {stats.last_kl}")
    if heldout is not None:
        heldout = list(heldout)
        stats.heldout_kl = evaluate_lens(model, lens, heldout)
        identity = TunedLens.for_model(model, lens.layers)
        stats.heldout_identity_kl = evaluate_lens(model, identity, heldout)
    lens.requires_grad_(False)
    return lens, stats
