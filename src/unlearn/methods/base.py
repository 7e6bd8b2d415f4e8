"""What every unlearning method shares: its config, the step context, the reference model.

A method is a dataclass of hyperparameters plus `loss(ctx) -> {"forget": t, "retain": t}`. The
trainer weights the terms by their scheduled coefficients (forget: `remove_coef`, decaying; retain:
`retain_coef`, ramping up) and logs each separately; it never branches on a method's name.

The step context owns every forward pass so frozen-model work is done once per micro-batch: the
reference's retain outputs and a source model's forget activations are computed under no_grad the
first time a loss asks for them and reused by every term of that micro-batch. With a frozen cache
(unlearn.training.frozen_cache) they are also kept per example and reused across epochs, runs and
processes: `StepContext.frozen` looks them up and computes only what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from unlearn.config.settings import LoraSettings, TrainConfig
from unlearn.data.batching import Batch
from unlearn.errors import UsageError
from unlearn.models.modes import adapters_disabled, eval_mode
from unlearn.models.refs import ModelRef
from unlearn.readouts.hooks import capture, forward_hiddens, num_layers
from unlearn.training import losses
from unlearn.training.frozen_cache import LOGITS_MAX_BYTES_PER_EXAMPLE, FrozenCache
from unlearn.training.schedules import forget_coef_at, retain_coef_at

RETAIN_LOSSES = ("kl", "l2", "ce", "mse")
FORGET_LOSSES = ("random_ce", "max_entropy")


@dataclass
class MethodConfig:
    """Coefficients and loss choices common to the unlearning methods. A method refuses those it
    does not read (`Method.uses`; the table in docs/methods.md)."""

    retain_coef: float = 5.0
    """Weight of the retain term (ramps from retain_ramp_start x retain_coef to retain_coef)."""
    remove_coef: float = 5.0
    """Weight of the forget term (decays linearly to forget_end_fraction x remove_coef)."""
    retain_ramp_start: float = 0.25
    """Retain coefficient at step 0, as a fraction of retain_coef (0 or 0.25 in the reference
    campaign)."""
    forget_end_fraction: float = 0.75
    """Forget coefficient at the last step, as a fraction of remove_coef."""
    retain_loss: str = "kl"
    """kl (output distributions), l2 (hidden states: distance per token), mse (hidden states:
    squared error per token and dimension, RMU's) or ce (language modelling on retain data)."""
    forget_loss: str = "random_ce"
    """random_ce (CE against random tokens / log V) or max_entropy (its exact expectation), for
    the methods whose forget term reads logits."""
    layers: list[int] = field(default_factory=list)
    """Target layers (block outputs, 0-based); empty = the method's default for the model depth."""
    retain_layers: list[int] = field(default_factory=list)
    """Blocks whose outputs the l2 retain term compares (0-based, mean over them); empty = the
    method's default, as in the reference campaign: lens = its target --layers, sequential and
    checkpoint_transfer = every block. Only with --retain_loss l2 (kl and ce read the logits)."""

    def __post_init__(self) -> None:
        for name in ("retain_coef", "remove_coef", "retain_ramp_start", "forget_end_fraction"):
            value = getattr(self, name)
            if value < 0 or value != value:
                raise UsageError(f"--{name} must be >= 0, got {value}")
        if self.retain_ramp_start > 1 or self.forget_end_fraction > 1:
            raise UsageError("--retain_ramp_start and --forget_end_fraction are fractions <= 1")
        if self.retain_loss not in RETAIN_LOSSES:
            raise UsageError(f"unknown retain_loss {self.retain_loss!r} (choose {RETAIN_LOSSES})")
        if self.forget_loss not in FORGET_LOSSES:
            raise UsageError(f"unknown forget_loss {self.forget_loss!r} (choose {FORGET_LOSSES})")
        for name in ("layers", "retain_layers"):
            layers = getattr(self, name)
            if len(set(layers)) != len(layers):
                raise UsageError(f"--{name} has duplicates: {layers}")
        if self.retain_layers and self.retain_loss not in ("l2", "mse"):
            # Silently ignoring it would make two runs that differ only here look different.
            raise UsageError(
                f"--retain_layers applies to --retain_loss l2 or mse only (got {self.retain_loss})"
            )

    def defaults(self) -> dict[str, object]:
        """{field: this config class's default} (a method's config overrides some shared ones)."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    def check_layers(self, n_layers: int) -> None:
        """Layers must exist in a model with n_layers blocks (checked from the config alone)."""
        for name in ("layers", "retain_layers"):
            bad = [layer for layer in getattr(self, name) if not 0 <= layer < n_layers]
            if bad:
                raise UsageError(f"--{name} {bad} outside the model's blocks 0..{n_layers - 1}")

    def check_inputs(self, model: ModelRef, n_layers: int) -> None:
        """Checks of the method's own inputs (helper files, hub ids) that need no weights; run
        by the recipe's validation, after `check_layers`. Nothing to check by default."""

    def check_training(self, model: ModelRef, train: TrainConfig, lora: LoraSettings) -> None:
        """The method's limits on the training settings (a data-parallel mode it cannot run
        under, a batch too small to split) and its training inputs, before weights load; run by
        the recipe's validation after `check_inputs`. None by default."""


SHARED_SETTINGS = tuple(f.name for f in dataclasses.fields(MethodConfig))
"""The settings every method's config has; each method declares those it reads (`Method.uses`)."""
SCHEDULED = ("retain_coef", "remove_coef", "retain_ramp_start", "forget_end_fraction",
             "retain_loss", "retain_layers")  # fmt: skip
"""What a method reads through the shared schedule (`unlearning_weights`) and retain term
(`retain_term`; retain_layers with an l2 or mse retain loss): every method but rr."""


def default_layers(n_layers: int) -> list[int]:
    """Every 5th block on deep models (the reference campaign's [5, 10, ..., 30] of 32); all inner
    blocks on small ones. The last block is left out: its output is what the unembedding reads
    directly."""
    if n_layers >= 12:
        return list(range(5, n_layers - 1, 5))
    return list(range(1, n_layers - 1)) or [0]


@dataclass
class Forward:
    """Outputs of one forward pass: logits (if computed) and block outputs at some layers."""

    logits: torch.Tensor | None
    hiddens: dict[int, torch.Tensor]


def run_forward(
    model: nn.Module, batch: Batch, layers: Sequence[int] = (), logits: bool = True
) -> Forward:
    """One forward; without logits it stops after the deepest requested block."""
    if not logits:
        return Forward(None, forward_hiddens(model, batch.input_ids, batch.attention_mask, layers))
    with capture(model, layers) as hiddens:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return Forward(out.logits, dict(hiddens))


class Reference:
    """The frozen original model.

    With LoRA it is the training model itself with its adapters disabled (no second copy in
    memory); with full fine-tuning it is a frozen copy in the training dtype (never quantised:
    quantisation noise swamps a KL retain loss, as the reference campaign's 4-bit reference showed).
    """

    def __init__(
        self, model: nn.Module, frozen_copy: nn.Module | None = None, key: dict | None = None
    ) -> None:
        self.model = model
        self.copy = frozen_copy
        self.key = key
        """The original weights' identity (model cache key, dtype, device) for the frozen cache;
        None: its outputs are never cached. Constant either way: LoRA freezes the base weights
        and the full fine-tuning reference is a frozen copy."""
        self.active = 0
        """How many `use` contexts are open: with LoRA the original is the trained module
        itself, so a hook on it that must leave the original's forwards alone (the latent
        adversary's, unlearn.training.modifiers) checks this."""
        if frozen_copy is not None:
            frozen_copy.eval().requires_grad_(False)
        elif not hasattr(model, "disable_adapter"):
            raise ValueError("full fine-tuning needs a frozen copy as its reference")

    @contextlib.contextmanager
    def use(self) -> Iterator[nn.Module]:
        """The original model, in eval mode (no dropout), for forwards inside the context."""
        self.active += 1
        try:
            if self.copy is not None:
                yield self.copy
                return
            with eval_mode(self.model), adapters_disabled(self.model):
                yield self.model
        finally:
            self.active -= 1

    def outputs_key(self, kind: str, layers: Sequence[int]) -> dict | None:
        """What identifies the reference's `kind` outputs at `layers` in the frozen cache."""
        if self.key is None:
            return None
        return {"frozen": "reference", **self.key, "outputs": kind, "layers": list(layers)}

    @torch.no_grad()
    def forward(self, batch: Batch, layers: Sequence[int] = (), logits: bool = True) -> Forward:
        with self.use() as model:
            return run_forward(model, batch, layers, logits)


@dataclass
class StepContext:
    """Everything a method's loss may use for one micro-batch."""

    model: nn.Module
    """The model being trained (PEFT-wrapped with LoRA)."""
    reference: Reference
    forget: Batch
    retain: Batch
    step: int
    """Optimizer step within the current phase."""
    total_steps: int
    """Optimizer steps in the current phase."""
    phase: int = 0
    generator: torch.Generator | None = None
    """RNG for random targets (seeded per run, so runs are reproducible)."""
    frozen_cache: FrozenCache | None = None
    """Per-example cache of frozen outputs (None: computed every micro-batch)."""
    forget_ids: list[str] | None = None
    """Identities of the forget batch's rows (ExampleStream.example_ids), for the frozen cache."""
    retain_ids: list[str] | None = None
    first_step: bool = False
    """The run's first optimizer step: the trained model still equals the frozen original, so
    frozen outputs are computed live, never read from the frozen cache (see `frozen`)."""
    _cache: dict = field(default_factory=dict, repr=False)

    def cached(self, key: str, compute) -> object:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def frozen(
        self,
        side: str,
        what: dict | None,
        names: Sequence[str],
        compute: Callable[[Batch], dict],
    ) -> dict[str, torch.Tensor]:
        """Frozen outputs on the `side` ("forget"/"retain") batch: `compute(batch)` returns them
        as {name: [batch, seq, ...]} tensors; `what` says what they are (frozen model identity,
        output kind, layers) or is None when they cannot be cached. Once per micro-batch; with
        the frozen cache, assembled from per-example entries (unlearn.training.frozen_cache)."""
        batch = self.forget if side == "forget" else self.retain
        ids = self.forget_ids if side == "forget" else self.retain_ids

        def lookup() -> dict[str, torch.Tensor]:
            if self.frozen_cache is None or ids is None or what is None or self.first_step:
                # The first step computes live: the trained model still equals the original,
                # so a retain term is exactly zero with zero gradient; a cached output computed
                # in another layout differs by float rounding, and Adam would scale that
                # rounding-level gradient up to a whole lr-sized step on every parameter no
                # other term reaches. Later the distances are real and rounding stays rounding.
                return compute(batch)
            lengths = batch.attention_mask.sum(dim=1).tolist()

            def one(i: int) -> dict[str, torch.Tensor]:  # example i alone, unpadded
                n = lengths[i]
                ids, mask = batch.input_ids[i : i + 1, :n], batch.attention_mask[i : i + 1, :n]
                return compute(Batch(ids, mask))

            device = batch.input_ids.device
            return self.frozen_cache.rows(what, names, ids, lengths, one, device)

        return self.cached(f"{side}:{json.dumps(what, sort_keys=True)}:{list(names)}", lookup)  # type: ignore[return-value]


def retain_term(ctx: StepContext, kind: str, layers: Sequence[int]) -> torch.Tensor:
    """The retain loss on ctx.retain: KL to the reference's outputs, L2 distance or squared error
    (mse) to its hidden states at `layers` (block outputs; the forwards stop after the deepest),
    or plain LM cross-entropy."""
    batch, mask = ctx.retain, ctx.retain.mask
    if kind == "ce":
        return losses.lm_ce(run_forward(ctx.model, batch).logits, batch.input_ids, mask)
    if kind == "kl":
        cur = run_forward(ctx.model, batch).logits
        # Large vocabularies: one example's logits would not fit the cache (docs/methods.md).
        per_example = cur.shape[-1] * cur.shape[1] * cur.element_size()
        what = ctx.reference.outputs_key("logits", [])
        if per_example > LOGITS_MAX_BYTES_PER_EXAMPLE:
            what = None
        ref = ctx.frozen(
            "retain", what, ["logits"], lambda b: {"logits": ctx.reference.forward(b).logits}
        )
        return losses.kl_retain(ref["logits"], cur, mask)
    layers = list(layers)
    names = [str(i) for i in layers]
    ref = ctx.frozen(
        "retain",
        ctx.reference.outputs_key("hiddens", layers),  # the layers: a forward stops at the deepest
        names,
        lambda b: {
            str(i): h for i, h in ctx.reference.forward(b, layers, logits=False).hiddens.items()
        },
    )
    cur = run_forward(ctx.model, batch, layers, logits=False).hiddens
    refs, curs = [ref[n] for n in names], [cur[i] for i in layers]
    if kind == "mse":  # activation_mse(pred, target) detaches its target: the reference's
        return losses.activation_mse(curs, refs, mask)
    return losses.l2_retain(refs, curs, mask)


def forget_on_logits(
    logits: torch.Tensor, mask: torch.Tensor, kind: str, generator
) -> torch.Tensor:
    if kind == "max_entropy":
        return losses.max_entropy(logits, mask)
    return losses.random_target_ce(logits, mask, generator)


@dataclass
class Phase:
    """A stretch of training with its own coefficient ramps (sequential has one per layer)."""

    name: str
    steps: int
    layer: int | None = None


class Method:
    """Base class: subclasses set `name`, `config_cls`, and implement `loss`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    """One line for the methods table (README, `unlearn run --help`)."""
    config_cls: ClassVar[type[MethodConfig]]
    train_defaults: ClassVar[dict] = {}
    """Per-method defaults of TrainConfig / LoraSettings fields (the documented configuration)."""
    uses: ClassVar[tuple[str, ...]]
    """The shared settings (`SHARED_SETTINGS`) this method reads; `register` requires it. Any
    other one set to a value other than its default is refused (`check_settings`)."""
    step_modifier: object | None = None
    """How the training loop computes this method's micro-batch gradients when a step modifier
    (latent adversary, sharpness-aware step: `unlearn.training.modifiers.StepModifier`) is
    configured; None: the loop's plain forward and backward. Set by the recipe, never read by
    the method itself."""

    @classmethod
    def check_settings(cls, cfg: MethodConfig) -> None:
        """UsageError naming the first shared setting that `cfg` moves from its default and this
        method never reads: runs that differ only there would train the same model under
        different names (run.json, a sweep's point ids, a search's trials)."""
        defaults = cfg.defaults()
        for name in SHARED_SETTINGS:
            value = getattr(cfg, name)
            if name not in cls.uses and value != defaults[name]:
                raise UsageError(
                    f"method {cls.name} does not use --{name} (got {value!r}): leave it at its"
                    f" default ({defaults[name]!r})"
                )

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg
        self.n_layers = 0
        self.layers: list[int] = list(cfg.layers)
        self.phase: Phase | None = None

    def setup(self, model: nn.Module, env: MethodEnv) -> None:
        """Load or fit what the method needs (lenses, affine maps, a source model)."""
        self.n_layers = num_layers(model)
        self.layers = list(self.cfg.layers) or default_layers(self.n_layers)

    @property
    def retain_layers(self) -> list[int]:
        """Blocks of the L2 retain term: --retain_layers, else the method's default (computed on
        use, so a subclass that settles its target layers after `setup` is followed)."""
        return sorted(self.cfg.retain_layers) or self.default_retain_layers()

    def default_retain_layers(self) -> list[int]:
        """Every block (sequential, checkpoint transfer); the lens method overrides it."""
        return list(range(self.n_layers))

    def phases(self, steps_per_phase: int) -> list[Phase]:
        return [Phase("main", steps_per_phase)]

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def retain(self, ctx: StepContext) -> torch.Tensor:
        return retain_term(ctx, self.cfg.retain_loss, self.retain_layers)

    def weights(self, step: int, total_steps: int) -> dict[str, float]:
        return unlearning_weights(self.cfg, step, total_steps)

    def trainable(self, name: str) -> bool:
        """Whether the parameter `name` (of the model as built: PEFT-wrapped with LoRA) trains.
        Every parameter the training mode leaves trainable, by default; a method that updates
        only part of the model (RMU: a few MLPs) narrows it. Applied after `setup`."""
        return True

    def describe(self) -> dict:
        """Resolved defaults, recorded in run.json's config (what the run really used)."""
        out: dict = {"layers": self.layers} if "layers" in self.uses else {}
        if self.cfg.retain_loss in ("l2", "mse"):
            out["retain_layers"] = self.retain_layers
        return out


@dataclass
class MethodEnv:
    """What `Method.setup` may use to find or fit its helpers (lenses, affine maps, sources)."""

    model_name: str
    tokenizer: object
    device: torch.device
    dtype: str
    """Training dtype: lenses and affine maps are fitted on the model in it."""
    mixed_precision: str = "no"
    """The training loop's compute dtype (--mixed_precision): frozen outputs computed in it are
    cached under it."""
    world: object | None = None
    """The mini World when running on one (fitted helpers are cached in its directory)."""
    fit_texts: list[str] = field(default_factory=list)
    """General text for fitting lenses / affine maps."""
    heldout_texts: list[str] = field(default_factory=list)
    """Other general text to report held-out fit quality."""
    out_dir: object | None = None
    trust_remote_code: bool = False
    """Whether the run's --model may run its own code (a source model is loaded likewise)."""
    revision: str | None = None
    """Hub revision of the model: with the name, what a fitted lens or affine map belongs to."""

    @property
    def model_ref(self) -> ModelRef:
        """The model as a `models.ModelRef` (name and revision)."""
        return ModelRef(self.model_name, self.revision, self.trust_remote_code)


def unlearning_weights(cfg: MethodConfig, step: int, total_steps: int) -> dict[str, float]:
    """Scheduled coefficients: forget decays from remove_coef, retain ramps up to retain_coef."""
    return {
        "forget": forget_coef_at(step, total_steps, cfg.remove_coef, cfg.forget_end_fraction),
        "retain": retain_coef_at(step, total_steps, cfg.retain_coef, cfg.retain_ramp_start),
    }
