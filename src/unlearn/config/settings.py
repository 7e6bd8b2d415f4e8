"""Typed configs shared by the commands, validated in __post_init__, and the one way to build
them from flat field names.

Field docstrings become `--help` text. Every check here runs before any weights load, so a bad
value costs one line on stderr and exit code 2, not a wasted model load.

Design choices:
- A config is made of sections (dataclasses); a section may nest another (`ModelArgs` inside
  `RunArgs`). On the command line simple-parsing flattens the nesting, so every field keeps its
  flat name (`--model`, `--lr`), and so do run.json configs, sweep specs and checkpoint configs.
- `build_sections` is the one builder from flat names (sweep specs, recipes called from code):
  it routes each name to the section that owns it, nested ones included, checks and coerces the
  value to the field's type, and constructs the sections. A flat name owned by two sections is a
  programming error, found the first time the sections are used together.
- Values are checked, not parsed: a YAML string is not read as a number (a quoted "1e-3" is an
  error), so one spec value has one type and one point id. An int for a float field becomes a
  float (`5` and `5.0` are one configuration); a path for a string field becomes its string.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from unlearn.distributed import DEFAULT_TIMEOUT_S, check_mode
from unlearn.errors import UsageError
from unlearn.models.refs import ModelRef, resolve_model

if typing.TYPE_CHECKING:
    from unlearn.world import World

OPTIMIZERS = ("adamw", "muon")
LR_DECAYS = ("constant", "linear", "cosine")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
MIXED_PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class ModelArgs:
    """The model: a local directory or a hub id (+ revision).

    The mini world (`--world`) is not part of this section: it is where a command also finds its
    corpora, questions and checkpoint list, and one world serves two models in fit-affine, so it
    is passed to `resolve` instead."""

    model: str | None = None
    """Model: a local directory (a relative path may also be inside --world) or a hub id; where
    a command has a default, it is the world's target."""
    revision: str | None = None
    """Hub revision (e.g. global_step38144) when --model is a hub id."""
    trust_remote_code: bool = False
    """Let --model run its own modelling code from the hub (off: it executes downloaded code)."""

    def resolve(
        self, world: World | None = None, default: str | os.PathLike | None = None
    ) -> ModelRef:
        """--model (else `default`, e.g. the world's target) checked from its config alone, no
        weights: a relative path that is not here is looked up inside the world directory."""
        name = self.model or default
        if not name:
            raise UsageError("--model is required")
        world_dir = world.root if world is not None else None
        return resolve_model(name, self.revision, self.trust_remote_code, world_dir=world_dir)


def _positive(name: str, value: float, strict: bool = True) -> None:
    bad = value <= 0 if strict else value < 0
    if bad or not math.isfinite(value):
        raise UsageError(f"--{name} must be {'> 0' if strict else '>= 0'}, got {value}")


def check_seed(value: object, name: str = "--seed") -> None:
    """The one rule for a seed, everywhere one is given (run, attack, robustness, world build,
    demo, sweep and search specs): an integer >= 0. numpy's generators refuse negative seeds
    while torch's accept them, so a negative seed would work in some commands only."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{name} must be an integer >= 0, got {value!r}")


OPERATIONAL_FIELDS = ("progress", "checkpoint_every", "collective_timeout")
"""Fields that cannot change a run's result: a resume may change them, and they are not part of
a sweep point's identity."""
ADDED_FIELDS = {"mixed_precision": "no", "gradient_checkpointing": False,
                "lat_eps": 0.0, "lat_steps": 4, "lat_layers": [], "sam_rho": 0.0}  # fmt: skip
"""Training fields added after runs were recorded without them: a missing one means its default,
so a checkpoint written before the field existed still resumes. (The step modifiers' fields,
`training.modifiers.StepModifiers`, are recorded only when given; their defaults here keep a
config that names them at their defaults equal to one that does not.)"""


@dataclass
class TrainConfig:
    """Optimisation settings of one training run (unlearning or tamper attack)."""

    lr: float = 1e-3
    """Learning rate (one rate for AdamW and Muon, Muon's update RMS matched to AdamW's), unless
    --muon_lr / --adam_lr give either its own."""
    optimizer: str = "adamw"
    """adamw, or muon (Muon for block 2-D matrices, AdamW for the rest)."""
    muon_lr: float | None = None
    """Muon's own learning rate (--optimizer muon), on Muon's scale (0.02 is usual); default:
    --lr, matched to AdamW's update size."""
    adam_lr: float | None = None
    """AdamW's learning rate (with --optimizer muon: of the tensors Muon does not take); default:
    --lr."""
    weight_decay: float = 0.0
    num_train_examples: int = 1024
    """Unique forget examples (documents); as many retain examples are drawn."""
    pdbs: int = 4
    """Per-device batch size (examples per micro-batch per process)."""
    grad_accum: int = 2
    """Micro-batches accumulated per optimizer step."""
    epochs: float = 1.0
    """Passes over the examples; sets the number of optimizer steps unless --max_steps is given."""
    max_steps: int | None = None
    """Fixed number of optimizer steps (overrides --epochs)."""
    warmup: float = 0.0
    """Linear LR warmup, as a fraction of the optimizer steps (the reference campaign used 0.5)."""
    lr_decay: str = "constant"
    """LR after warmup: constant, linear or cosine."""
    max_length: int = 256
    """Tokens per example (documents are truncated)."""
    grad_clip: float = 1.0
    """Max gradient norm (0 disables clipping)."""
    seed: int = 0
    """Seed of the data order, dropout and any random targets (an integer >= 0)."""
    dtype: str = "float32"
    """Stored dtype of the model's weights and of the frozen reference (never quantised)."""
    mixed_precision: str = "no"
    """Compute in bf16 or fp16 under autocast while the weights and the optimizer state stay in
    float32 (fp16 adds a gradient scaler); frozen models compute in the same dtype. no: compute
    in --dtype."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them
    (non-reentrant activation checkpointing): far less activation memory for about one more
    forward per step."""
    diverge_factor: float = 1000.0
    """A loss term above this multiple of its first value (and of 1.0) marks the run diverged."""
    log_every: int = 1
    """Optimizer steps between metric rows."""
    checkpoint_every: int = 0
    """Optimizer steps between resumable checkpoints in OUT/checkpoint (0: only on SIGTERM/USR1)."""
    distributed: str = "none"
    """Data parallelism under torchrun: none, ddp or fsdp2 (see docs/distributed.md)."""
    collective_timeout: float = DEFAULT_TIMEOUT_S
    """Seconds a collective of a data-parallel run may wait for the other ranks before the run
    fails with one line naming the rank and the step (instead of hanging)."""

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        for name in ("muon_lr", "adam_lr"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        _positive("weight_decay", self.weight_decay, strict=False)
        _positive("epochs", self.epochs)
        _positive("grad_clip", self.grad_clip, strict=False)
        _positive("diverge_factor", self.diverge_factor)
        _positive("checkpoint_every", self.checkpoint_every, strict=False)
        _positive("collective_timeout", self.collective_timeout)
        check_seed(self.seed)
        for name in ("num_train_examples", "pdbs", "grad_accum", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r} (choose from {OPTIMIZERS})")
        if self.muon_lr is not None and self.optimizer != "muon":
            raise UsageError("--muon_lr applies to --optimizer muon only")
        if self.lr_decay not in LR_DECAYS:
            raise UsageError(f"unknown lr_decay {self.lr_decay!r} (choose from {LR_DECAYS})")
        if self.dtype not in DTYPE_NAMES:
            raise UsageError(f"unknown dtype {self.dtype!r} (choose from {DTYPE_NAMES})")
        check_mode(self.distributed)
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise UsageError(
                f"unknown mixed_precision {self.mixed_precision!r} (choose from {MIXED_PRECISIONS})"
            )
        if self.mixed_precision != "no" and self.dtype != "float32":
            raise UsageError(
                f"--mixed_precision {self.mixed_precision} keeps float32 master weights: it needs"
                f" --dtype float32, got --dtype {self.dtype}"
            )
        if self.mixed_precision == "fp16" and self.distributed == "fsdp2":
            # fp16's gradient scaler is not wired to FSDP2's sharded gradients here; bf16 needs
            # no scaler and is what FSDP2 runs use.
            raise UsageError(
                "--mixed_precision fp16 is not supported with --distributed fsdp2: use bf16"
            )

    def steps(self, world_size: int = 1) -> int:
        """Optimizer steps: explicit, or epochs x examples / effective batch (rounded up)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(
            1, math.ceil(self.epochs * self.num_train_examples / self.effective_batch(world_size))
        )

    def effective_batch(self, world_size: int = 1) -> int:
        return self.pdbs * self.grad_accum * world_size


@dataclass
class LoraSettings:
    """LoRA (peft) or full fine-tuning."""

    lora: bool = True
    """Train LoRA adapters (reference = adapters disabled); --lora false for full fine-tuning."""
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules to adapt; all-linear = every linear layer of the blocks (not the unembedding)."""
    merge: bool = True
    """Also save the merged model at OUT/model (the adapter is always saved at OUT/adapter)."""

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise UsageError(f"--lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise UsageError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")


# -- the one builder from flat names --------------------------------------------------------


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """{field: resolved type} of a dataclass (annotations are strings under __future__)."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def flat_fields(classes: tuple[type, ...]) -> dict[str, tuple[type, Any]]:
    """{flat name: (the section that owns it, its type)} for `classes` and the sections nested
    in them, as the command line names them."""
    owners: dict[str, tuple[type, Any]] = {}

    def walk(cls: type) -> None:
        for name, hint in _hints(cls).items():
            if _is_section(hint):
                walk(hint)
            elif name in owners:
                raise TypeError(
                    f"config field {name} is in both {owners[name][0].__name__} and {cls.__name__}"
                )
            else:
                owners[name] = (cls, hint)

    for cls in classes:
        walk(cls)
    return owners


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` checked against the type `hint` (one-line UsageError naming `name` if it does not
    fit): an int becomes a float for a float field, a path a string for a string field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        concrete = [a for a in options if a is not type(None)]
        return coerce(value, concrete[0], name) if len(concrete) == 1 else value
    if origin is list:
        if not isinstance(value, list):
            raise UsageError(f"{name} must be a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [coerce(v, item, name) for v in value]
    if hint is bool and not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise UsageError(f"{name} must be a string, got {value!r}")
    return value


def coerce_values(
    classes: Sequence[type], values: Mapping[str, Any], what: str = "config", where: str = ""
) -> dict[str, Any]:
    """`values` ({flat name: value}) checked and coerced to their fields' types.

    UsageError (one line, prefixed by `where`) for a name no section has or a value of the wrong
    type; `what` names the config in the unknown-field message ("attack config")."""
    prefix = f"{where}: " if where else ""
    owners = flat_fields(tuple(classes))
    unknown = sorted(str(k) for k in values if k not in owners)
    if unknown:
        raise UsageError(f"{prefix}unknown {what} field(s): {', '.join(unknown)}")
    return {k: coerce(v, owners[k][1], f"{prefix}{k}") for k, v in values.items()}


def section_defaults(
    classes: Sequence[type], values: Mapping[str, Any]
) -> dict[type, dict[str, Any]]:
    """{section class: {field: value}} with every field of each of `classes`: `values[name]`
    (flat names, checked by `coerce_values`) else the field's default; a nested section is a
    dict under its field name (`model` -> {"model_args": {"model": ...}} of RunArgs).

    No section is constructed, so none validates a value here: these are a parser's defaults
    (simple-parsing's `add_arguments(default=...)`), checked once the flags are parsed. Every
    field is present because simple-parsing reads a field missing from a dict default as None."""

    def walk(cls: type) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            hint = _hints(cls)[f.name]
            if _is_section(hint):
                out[f.name] = walk(hint)
            elif f.name in values:
                out[f.name] = copy.deepcopy(values[f.name])
            elif f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    return {cls: walk(cls) for cls in classes}


def build_sections(
    classes: Sequence[type], values: Mapping[str, Any], what: str = "config", where: str = ""
) -> dict[type, Any]:
    """{section class: instance} for each of `classes`, from flat names.

    Each value is routed to the section that owns its name (nested sections included: `model`
    goes to the ModelArgs inside RunArgs), checked and coerced as by `coerce_values`; the rest
    keep their defaults. Every section validates itself (__post_init__)."""
    owners = flat_fields(tuple(classes))
    per: dict[type, dict[str, Any]] = {}
    for name, value in coerce_values(classes, values, what, where).items():
        per.setdefault(owners[name][0], {})[name] = value

    def construct(cls: type) -> Any:
        kwargs = dict(per.get(cls, {}))
        for name, hint in _hints(cls).items():
            if _is_section(hint):
                kwargs[name] = construct(hint)
        return cls(**kwargs)

    try:
        return {cls: construct(cls) for cls in classes}
    except TypeError as e:
        prefix = f"{where}: " if where else ""
        raise UsageError(f"{prefix}bad config value: {e}") from None
