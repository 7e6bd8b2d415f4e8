"""Optimizers: AdamW, or Muon for the block matrices plus AdamW for everything else.

Routing for "muon" is by module membership and shape, never by size: a trainable parameter goes to
`torch.optim.Muon` exactly when it is a 2-D tensor inside the transformer block list
(`unlearn.readouts.hooks.get_blocks`): attention and MLP weight matrices in full fine-tuning, the
`lora_A` / `lora_B` matrices of the blocks with LoRA. Everything else (token embeddings, the
unembedding, norms, biases, any non-2-D tensor) goes to AdamW, which Muon's orthogonalised update
does not suit. The reference campaign routed by a parameter-count threshold, which sent the largest
matrices to AdamW and diverged; membership cannot make that mistake. Frozen parameters are given to
neither.

By default one learning rate serves both: Muon runs with `adjust_lr_fn="match_rms_adamw"`, which
scales each matrix's step to the RMS of an AdamW step (0.2 * sqrt(max(rows, cols)) * lr), so
AdamW's learning rate and decoupled weight decay carry over. `muon_lr` gives Muon a rate of its
own instead, on Muon's own scale (torch's "original" adjustment, sqrt(max(1, rows/cols)) * lr, for
which 0.02 is the usual value, as in the reference campaign's muon_lr / adam_lr grids): a rate tuned
apart from AdamW's has no reason to be expressed in AdamW's units. `adam_lr` likewise replaces `lr`
for the AdamW groups. AdamW applies weight decay to tensors of two or more dimensions only; decaying
norm gains and biases toward zero is never wanted.

`MultiOptimizer` holds the optimizers by name and looks like one optimizer to the trainer. The
trainer schedules the learning rate itself, each step: `group["lr"] = group["base_lr"] * mult`
for every group in `param_groups` (each group keeps its own base rate); no torch LR scheduler is
involved.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from unlearn.errors import UsageError
from unlearn.readouts.hooks import get_blocks
from unlearn.training.sharded_muon import ShardedMuon

OPTIMIZERS = ("adamw", "muon")

_Named = list[tuple[str, nn.Parameter]]


def route_parameters(model: nn.Module, name: str) -> dict[str, _Named]:
    """Trainable (name, parameter) pairs per optimizer ("muon" and/or "adamw"), in model order."""
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
    in_blocks = {id(p) for p in get_blocks(model).parameters()}
    routes: dict[str, _Named] = {"muon": [], "adamw": []} if name == "muon" else {"adamw": []}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "muon" and p.ndim == 2 and id(p) in in_blocks:
            routes["muon"].append((pname, p))
        else:
            routes["adamw"].append((pname, p))
    if not any(routes.values()):
        raise UsageError("the model has no trainable parameters")
    return routes


def describe_routing(model: nn.Module, name: str = "muon") -> dict[str, dict[str, Any]]:
    """Per optimizer: number of tensors, number of scalars and parameter names (for printing)."""
    return {
        opt: {
            "tensors": len(named),
            "params": sum(p.numel() for _, p in named),
            "names": [n for n, _ in named],
        }
        for opt, named in route_parameters(model, name).items()
    }


class MultiOptimizer:
    """Several torch optimizers stepped together, presented as one.

    `param_groups` is the concatenation of the optimizers' groups (the same dict objects, so
    setting a group's "lr" reaches the optimizer); each group carries "optimizer" (its owner's
    name) and "base_lr".
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("MultiOptimizer needs at least one optimizer")
        self.optimizers = dict(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter being optimized (e.g. for gradient-norm clipping)."""
        for group in self.param_groups:
            yield from group["params"]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise UsageError(
                f"saved optimizer state is for {sorted(state)}, this run uses "
                f"{sorted(self.optimizers)} (resume with the same optimizer setting)"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    muon_momentum: float = 0.95,
    muon_lr: float | None = None,
    adam_lr: float | None = None,
) -> MultiOptimizer:
    """AdamW over every trainable parameter ("adamw"), or Muon + AdamW as routed above ("muon").

    `lr` is the base rate of every group unless `muon_lr` (Muon's groups, on Muon's own scale;
    "muon" only) or `adam_lr` (AdamW's groups) replaces it."""
    for what, value in (("learning rate", lr), ("muon_lr", muon_lr), ("adam_lr", adam_lr)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{what} must be > 0, got {value}")
    if weight_decay < 0:
        raise UsageError(f"weight decay must be >= 0, got {weight_decay}")
    if muon_lr is not None and name != "muon":
        raise UsageError("muon_lr applies to the muon optimizer only")
    routes = route_parameters(model, name)
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if routes.get("muon"):
        base = lr if muon_lr is None else muon_lr
        # FSDP2 shards the matrices: ShardedMuon gathers each one to orthogonalise it.
        optimizers["muon"] = ShardedMuon(
            [{"params": [p for _, p in routes["muon"]], "optimizer": "muon", "base_lr": base}],
            lr=base,
            weight_decay=weight_decay,
            momentum=muon_momentum,
            adjust_lr_fn="match_rms_adamw" if muon_lr is None else "original",
        )
    if routes["adamw"]:
        base = lr if adam_lr is None else adam_lr
        decay = [p for _, p in routes["adamw"] if p.ndim >= 2]
        no_decay = [p for _, p in routes["adamw"] if p.ndim < 2]
        groups = [
            {"params": ps, "weight_decay": wd, "optimizer": "adamw", "base_lr": base}
            for ps, wd in ((decay, weight_decay), (no_decay, 0.0))
            if ps
        ]
        optimizers["adamw"] = torch.optim.AdamW(groups, lr=base, betas=betas, eps=eps)
    return MultiOptimizer(optimizers)


def torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind a `MultiOptimizer` (or a plain optimizer)."""
    inner = getattr(optimizer, "optimizers", None)
    return list(inner.values()) if isinstance(inner, dict) else [optimizer]
