"""The one training loop, shared by every unlearning method and by the tamper attack.

An objective supplies `loss(ctx) -> {name: term}` and `weights(phase_step, phase_steps) ->
{name: coefficient}`; the loop does the rest: micro-batches from deterministic streams, gradient
accumulation, LR warmup/decay, clipping, guards, logging, progress.

Schedules are measured in optimizer steps (never micro-batches or dataset size). Everything needed
to resume sits in `TrainState`. Guards:
- a non-finite term, or one above `diverge_factor` x max(its first value, 1), raises DivergedError;
- a retain coefficient > 0 whose term stays exactly 0 once the model has moved raises
  RetainZeroError (the reference campaign's "retain loss was always 0" bug: a reference equal to the
  model).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from unlearn.config.settings import TrainConfig
from unlearn.data.batching import ExampleStream
from unlearn.distributed import Parallel
from unlearn.errors import DivergedError, RetainZeroError
from unlearn.methods.base import Phase, Reference, StepContext
from unlearn.training.checkpointer import Checkpointer
from unlearn.training.frozen_cache import FrozenCache
from unlearn.training.modifiers import MicroBatch, StepModifier
from unlearn.training.optim import build_optimizer
from unlearn.training.precision import Precision
from unlearn.training.schedules import lr_mult_at

THROUGHPUT = "tokens_per_s"
"""The wall-clock value `on_timing` gets: tokens (forget and retain, every process) per second."""
RETAIN_ZERO_CHECK_STEP = 3
"""Optimizer step by which a retain term that is exactly 0 since step 1 counts as a bug."""


class Objective(Protocol):
    """What the loop trains. An objective may also carry `step_modifier` (a
    `training.modifiers.StepModifier`, or None): then the modifier computes each micro-batch's
    gradients (latent adversary, sharpness-aware step) instead of the plain forward and
    backward."""

    phase: Phase | None

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]: ...

    def weights(self, step: int, total_steps: int) -> dict[str, float]: ...


@dataclass
class TrainState:
    """All resumable state of a run besides model and optimizer tensors."""

    step: int = 0
    """Optimizer steps completed (across phases)."""
    first_values: dict[str, float] = field(default_factory=dict)
    """First value of each loss term (reference for the divergence guard)."""
    retain_seen_nonzero: bool = False
    last: dict[str, float] = field(default_factory=dict)
    """Latest logged values (loss terms, coefficients, lr, grad norm)."""
    scaler: dict | None = None
    """The fp16 gradient scaler's state (`precision.Precision.state`; None without one)."""


@dataclass
class Plan:
    """What a run will do, printed before it starts (the reference campaign's silent-epoch
    pitfall)."""

    unique_examples: int
    steps_per_phase: int
    phases: list[Phase]
    effective_batch: int
    world_size: int

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    @property
    def examples_drawn(self) -> int:
        """Examples the run reads: every phase draws from the same stream (micro-batch k is
        indexed by the global step), so a second phase reads the next epoch, not the first."""
        return self.total_steps * self.effective_batch

    @property
    def epochs(self) -> float:
        """Passes over the unique examples across all phases (> 1: examples are repeated)."""
        return self.examples_drawn / self.unique_examples

    def describe(self, cfg: TrainConfig) -> str:
        return (
            f"examples: {self.unique_examples} unique, {self.examples_drawn} drawn | optimizer"
            f" steps: {self.total_steps} ({len(self.phases)} phase(s) x {self.steps_per_phase})"
            f" | effective batch: {self.effective_batch} = {cfg.pdbs} per device x"
            f" {cfg.grad_accum} accumulation x {self.world_size} process(es) | effective epochs:"
            f" {self.epochs:.2f}"
        )


def make_plan(cfg: TrainConfig, unique_examples: int, phases_for, world_size: int = 1) -> Plan:
    steps = cfg.steps(world_size)
    return Plan(
        unique_examples, steps, phases_for(steps), cfg.effective_batch(world_size), world_size
    )


def _micro_seed(seed: int, k: int) -> int:
    return (seed * 7_919 + k * 104_729) % (2**63)


def train(
    model: torch.nn.Module,
    objective: Objective,
    reference: Reference | None,
    forget: ExampleStream,
    retain: ExampleStream | None,
    cfg: TrainConfig,
    plan: Plan,
    state: TrainState | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
    rank: int = 0,
    device: torch.device | str = "cpu",
    parallel: Parallel | None = None,
    checkpointer: Checkpointer | None = None,
    frozen_cache: FrozenCache | None = None,
    on_timing: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainState:
    """Run the plan from `state.step` to the end; returns the final state.

    on_log(step, values) receives each metric row; on_step(step) runs after every optimizer step
    (and once before the first, with step 0), e.g. for an attack's evaluation curve.
    on_timing(step, {THROUGHPUT: tokens/s}) comes with each row: wall-clock, so not in the row,
    whose values a rerun reproduces (experiment trackers plot it, unlearn.tracking).
    `parallel` (DDP/FSDP2 under torchrun, see unlearn.distributed) runs each micro-batch's
    objective, synchronises gradients on the last micro-batch of a step and averages logged
    values over ranks; without it the loop is one plain process.
    `checkpointer` (unlearn.training.checkpointer) restores a saved checkpoint before the first
    step and saves after steps (periodically, or on SIGTERM, then raising Preempted).
    `frozen_cache` (unlearn.training.frozen_cache) keeps frozen-model outputs per example across
    epochs and runs; the losses are the same with or without it, up to float rounding.
    """
    state = state or TrainState()
    par = parallel or Parallel(rank=rank, device=torch.device(device))
    rank = par.rank
    optimizer = build_optimizer(
        model,
        cfg.optimizer,
        cfg.lr,
        weight_decay=cfg.weight_decay,
        muon_lr=cfg.muon_lr,
        adam_lr=cfg.adam_lr,
    )
    if checkpointer is not None:
        # A checkpoint's weights, optimizer moments, RNG and step replace the fresh ones.
        state = checkpointer.restore(model, optimizer, TrainState) or state
    precision = Precision(cfg.mixed_precision, device)
    precision.load_state(state.scaler)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    modifier: StepModifier | None = getattr(objective, "step_modifier", None)
    if modifier is not None:
        modifier.check(par)
    if rank == 0:
        print(plan.describe(cfg), file=sys.stderr)
        if plan.epochs > 1.0 + 1e-9:
            print(
                f"warning: {plan.epochs:.2f} effective epochs: examples are repeated",
                file=sys.stderr,
            )
    model.train()
    if on_step is not None and state.step == 0:
        on_step(0)
    bar = tqdm(
        total=plan.total_steps, initial=state.step, desc="train", disable=not progress or rank != 0
    )
    # Phase boundaries in global optimizer steps.
    starts = [sum(p.steps for p in plan.phases[:i]) for i in range(len(plan.phases))]
    warmup_steps = min(int(cfg.warmup * plan.total_steps), plan.total_steps - 1)
    # Logged rates: "lr" is AdamW's (--adam_lr, else --lr), "muon_lr" Muon's when it has its own.
    base_lrs = {"lr": cfg.lr if cfg.adam_lr is None else cfg.adam_lr}
    if cfg.muon_lr is not None:
        base_lrs["muon_lr"] = cfg.muon_lr
    while state.step < plan.total_steps:
        # A collective that times out or loses a peer ends the run in one line naming
        # this rank and the step (distributed.collective_failure).
        with par.naming_failures(f"at step {state.step + 1}"):
            phase_idx = max(i for i, s in enumerate(starts) if s <= state.step)
            phase = plan.phases[phase_idx]
            objective.phase = phase
            phase_step = state.step - starts[phase_idx]
            weights = objective.weights(phase_step, phase.steps)
            lr_mult = lr_mult_at(state.step, plan.total_steps, warmup_steps, cfg.lr_decay)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_mult

            sums: dict[str, float] = {}
            tokens, started = 0, time.perf_counter()
            for a in range(cfg.grad_accum):
                k = (state.step * cfg.grad_accum + a) * plan.world_size + rank
                ctx = StepContext(
                    model=model,
                    reference=reference,  # type: ignore[arg-type]
                    forget=forget.batch(k).to(device),
                    retain=retain.batch(k).to(device) if retain is not None else None,  # type: ignore[arg-type]
                    step=phase_step,
                    total_steps=phase.steps,
                    phase=phase_idx,
                    generator=torch.Generator(device=device).manual_seed(_micro_seed(cfg.seed, k)),
                    frozen_cache=frozen_cache,
                    forget_ids=forget.example_ids(k) if frozen_cache is not None else None,
                    retain_ids=(
                        retain.example_ids(k) if frozen_cache is not None and retain else None
                    ),
                    first_step=state.step == 0,
                )
                with par.micro_batch(last=a == cfg.grad_accum - 1):
                    if modifier is None:
                        with precision.autocast():
                            terms = par.loss(lambda ctx=ctx: objective.loss(ctx))
                            total = sum(weights.get(n, 0.0) * value for n, value in terms.items())
                        precision.backward(total / cfg.grad_accum)  # type: ignore[arg-type]
                    else:  # a step modifier (LAT, SAM) computes this micro-batch's gradients
                        mb = MicroBatch(objective, weights, cfg.grad_accum, precision, par, params)
                        terms = modifier.micro_batch(ctx, mb)
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.item() / cfg.grad_accum
                tokens += ctx.forget.num_tokens + (ctx.retain.num_tokens if ctx.retain else 0)
            sums = par.mean(sums)  # every rank logs and guards the same global values
            _check_terms(sums, state, weights, cfg)
            precision.unscale(optimizer)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if cfg.grad_clip > 0
                else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            )
            precision.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.scaler = precision.state()
            values = {
                **sums,
                **{f"coef_{n}": w for n, w in weights.items()},
                "loss": sum(weights.get(n, 0.0) * v for n, v in sums.items()),
                **{name: base * lr_mult for name, base in base_lrs.items()},
                "grad_norm": par.item(grad_norm),
            }
            state.last = values
            if on_log is not None and (
                state.step % cfg.log_every == 0 or state.step == plan.total_steps
            ):
                on_log(state.step, values)
                if on_timing is not None:  # this rank's count x processes: ranks draw alike
                    seconds = time.perf_counter() - started
                    on_timing(state.step, {THROUGHPUT: tokens * plan.world_size / seconds})
            bar.update(1)
            bar.set_postfix({n: f"{v:.4g}" for n, v in sums.items()}, refresh=False)
            if on_step is not None:
                on_step(state.step)
            if checkpointer is not None:
                checkpointer.after_step(model, optimizer, state, plan.total_steps)
    bar.close()
    return state


def _check_terms(
    values: dict[str, float], state: TrainState, weights: dict[str, float], cfg: TrainConfig
) -> None:
    for name, value in values.items():
        first = state.first_values.setdefault(name, value)
        if not math.isfinite(value):
            raise DivergedError(f"loss term {name!r} is {value} at step {state.step}")
        limit = cfg.diverge_factor * max(abs(first), 1.0)
        if abs(value) > limit:
            raise DivergedError(
                f"loss term {name!r} exploded to {value:.4g} at step {state.step}"
                f" (first value {first:.4g}, limit {limit:.4g})"
            )
    retain = values.get("retain")
    if retain is None or weights.get("retain", 0.0) <= 0:
        return
    # Step 0 is computed before any update (a fresh LoRA adapter is the identity), so only
    # later steps can show that the reference really differs from the trained model.
    if state.step >= 1 and retain != 0.0:
        state.retain_seen_nonzero = True
    if state.step == RETAIN_ZERO_CHECK_STEP and not state.retain_seen_nonzero:
        raise RetainZeroError(
            f"retain_coef > 0 but the retain term was exactly 0 for steps 1..{state.step}: "
            "the reference model is the model being trained"
        )
