"""Step modifiers: settings that change how any unlearning method's micro-batch gradients are
computed, without being methods themselves (docs/methods.md, "Step modifiers").

- `--lat_eps` (with `--lat_steps`, `--lat_layers`): targeted latent adversarial training
  (`lat`): the forget term is computed under a residual-stream perturbation that a PGD
  adversary chose to make the forget text likely again.
- `--sam_rho`: sharpness-aware unlearning (`sam`): the forget term's gradient is taken at the
  weights moved by ρ in its own ascent direction, the others' at the weights themselves.

Both off (the defaults) the recipe gives the method no modifier and the loop runs its plain
path, unchanged. The modifier works on the loop's own micro-batch machinery (`micro`), so
gradient accumulation, autocast and the fp16 gradient scaler, LoRA and full fine-tuning behave
as without it; it reads only the step context and the term named "forget", never a method's
name. Data parallelism: LAT runs under DDP (the adversary's forwards and gradients are this
rank's and touch no parameter gradient; the perturbed loss goes through DDP as usual); SAM's
extra backward and weight moves between DDP's forward and gradient synchronisation are not
supported, nor is either under FSDP2 (sharded weights and gradient hooks): both refused in one
line before any weights load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from unlearn.distributed import Parallel
from unlearn.errors import UsageError
from unlearn.methods.base import StepContext
from unlearn.training.modifiers.lat import adversary, default_lat_layers, perturbing
from unlearn.training.modifiers.micro import MicroBatch
from unlearn.training.modifiers.sam import sam_micro_batch

DEFAULT_LAT_STEPS = 4


@dataclass
class StepModifiers:
    """Step modifiers any unlearning method can be trained with (both off by default)."""

    lat_eps: float = 0.0
    """Latent adversarial training: L2 radius, per token, of the perturbation a PGD adversary
    adds to the outputs of --lat_layers to make the forget text likely again before the
    forget term is computed (0: off). On the scale of the residual stream's per-token norm."""
    lat_steps: int = DEFAULT_LAT_STEPS
    """PGD steps of the latent adversary per micro-batch (with --lat_eps > 0)."""
    lat_layers: list[int] = field(default_factory=list)
    """Blocks (0-based) whose outputs the latent adversary perturbs (with --lat_eps > 0);
    empty: one block an eighth of the way up (4 of 32), below the blocks the methods read."""
    sam_rho: float = 0.0
    """Sharpness-aware unlearning: take the forget term's gradient at the trainable weights
    moved by this L2 distance along that gradient, the way a relearning attack would move them
    (0: off)."""

    def __post_init__(self) -> None:
        for name in ("lat_eps", "sam_rho"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UsageError(f"--{name} must be a number >= 0 (0: off), got {value}")
        if self.lat_eps == 0 and (self.lat_steps != DEFAULT_LAT_STEPS or self.lat_layers):
            # A setting that changes nothing would make two identical runs look different.
            raise UsageError("--lat_steps and --lat_layers apply only with --lat_eps > 0")
        if self.lat_steps < 1:
            raise UsageError(f"--lat_steps must be >= 1, got {self.lat_steps}")
        if len(set(self.lat_layers)) != len(self.lat_layers):
            raise UsageError(f"--lat_layers has duplicates: {self.lat_layers}")

    @property
    def enabled(self) -> bool:
        return self.lat_eps > 0 or self.sam_rho > 0

    def check_layers(self, n_layers: int) -> None:
        """--lat_layers must be blocks of a model with n_layers blocks (from its config)."""
        bad = [i for i in self.lat_layers if not 0 <= i < n_layers]
        if bad:
            raise UsageError(f"--lat_layers {bad} outside the model's blocks 0..{n_layers - 1}")

    def check_mode(self, distributed: str) -> None:
        """UsageError for a data-parallel mode a modifier does not support (see the module)."""
        if distributed == "fsdp2" and self.enabled:
            raise UsageError("--lat_eps and --sam_rho are not supported with --distributed fsdp2")
        if distributed == "ddp" and self.sam_rho > 0:
            raise UsageError("--sam_rho is not supported with --distributed ddp (LAT is)")


def modifier_fields(cfg: StepModifiers) -> dict:
    """The fields given (none: the defaults), for run.json's config: a run without modifiers
    records exactly what it recorded before they existed."""
    defaults = StepModifiers()
    return {k: v for k, v in vars(cfg).items() if v != getattr(defaults, k)}


class StepModifier:
    """Computes one micro-batch's gradients with LAT and/or SAM (the loop asks it instead of
    running its plain forward and backward)."""

    def __init__(self, cfg: StepModifiers, n_layers: int) -> None:
        cfg.check_layers(n_layers)
        self.cfg = cfg
        self.lat_layers = sorted(cfg.lat_layers) or default_lat_layers(n_layers)

    def check(self, par: Parallel) -> None:
        """Refuse a data-parallel mode this modifier does not support (also checked from the
        config before weights load; here for callers of the loop)."""
        self.cfg.check_mode(par.mode)

    def micro_batch(self, ctx: StepContext, mb: MicroBatch) -> dict[str, torch.Tensor]:
        """Accumulate the micro-batch's gradients into `.grad`; return its terms for logging."""
        if self.cfg.lat_eps <= 0:
            return self._update(ctx, mb)
        deltas = adversary(ctx, mb, self.lat_layers, self.cfg.lat_eps, self.cfg.lat_steps)
        with perturbing(ctx, deltas) as reached:
            terms = self._update(ctx, mb)
        missing = [layer for layer in self.lat_layers if layer not in reached]
        if missing and ctx.phase == 0:
            # The forget forward stopped below these blocks: LAT would silently be off. Only
            # the first phase is held to it: sequential's later phases read lower blocks by
            # design and train there without the perturbation of the blocks above.
            raise UsageError(
                f"--lat_layers {missing}: the method's forward on the forget batch never reaches"
                " these blocks; give blocks at or below the ones it reads"
            )
        return terms

    def _update(self, ctx: StepContext, mb: MicroBatch) -> dict[str, torch.Tensor]:
        if self.cfg.sam_rho > 0:
            return sam_micro_batch(ctx, mb, self.cfg.sam_rho)
        terms = mb.terms(ctx)
        mb.backward(terms)
        return terms

    def describe(self) -> dict:
        """Resolved defaults for run.json (the latent adversary's blocks)."""
        return {"lat_layers": self.lat_layers} if self.cfg.lat_eps > 0 else {}


def build_modifier(cfg: StepModifiers, n_layers: int) -> StepModifier | None:
    """The modifier for `cfg`, or None when both are off (the loop's plain path)."""
    return StepModifier(cfg, n_layers) if cfg.enabled else None


__all__ = [
    "MicroBatch",
    "StepModifier",
    "StepModifiers",
    "build_modifier",
    "modifier_fields",
]
