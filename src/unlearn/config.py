"""Typed configs shared by the training commands (run, attack), validated in __post_init__.

Field docstrings become `--help` text. Every check here runs before any weights load, so a bad
value costs one line on stderr and exit code 2, not a wasted model load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from unlearn.errors import UsageError

OPTIMIZERS = ("adamw", "muon")
LR_DECAYS = ("constant", "linear", "cosine")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _positive(name: str, value: float, strict: bool = True) -> None:
    bad = value <= 0 if strict else value < 0
    if bad or not math.isfinite(value):
        raise UsageError(f"--{name} must be {'> 0' if strict else '>= 0'}, got {value}")


@dataclass
class TrainConfig:
    """Optimisation settings of one training run (unlearning or tamper attack)."""

    lr: float = 1e-3
    """Learning rate (one rate for AdamW and Muon: Muon's update RMS is matched to AdamW's)."""
    optimizer: str = "adamw"
    """adamw, or muon (Muon for block 2-D matrices, AdamW for the rest)."""
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
    """Linear LR warmup, as a fraction of the optimizer steps (the seeds used 0.5)."""
    lr_decay: str = "constant"
    """LR after warmup: constant, linear or cosine."""
    max_length: int = 256
    """Tokens per example (documents are truncated)."""
    grad_clip: float = 1.0
    """Max gradient norm (0 disables clipping)."""
    seed: int = 0
    dtype: str = "float32"
    """Training dtype of the model and of the frozen reference (never quantised)."""
    diverge_factor: float = 1000.0
    """A loss term above this multiple of its first value (and of 1.0) marks the run diverged."""
    log_every: int = 1
    """Optimizer steps between metric rows."""
    checkpoint_every: int = 0
    """Optimizer steps between resumable checkpoints in OUT/checkpoint (0: only on SIGTERM/USR1)."""
    distributed: str = "none"
    """Data parallelism under torchrun: none, ddp or fsdp2 (see docs/distributed.md)."""

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        _positive("weight_decay", self.weight_decay, strict=False)
        _positive("epochs", self.epochs)
        _positive("grad_clip", self.grad_clip, strict=False)
        _positive("diverge_factor", self.diverge_factor)
        _positive("checkpoint_every", self.checkpoint_every, strict=False)
        for name in ("num_train_examples", "pdbs", "grad_accum", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r} (choose from {OPTIMIZERS})")
        if self.lr_decay not in LR_DECAYS:
            raise UsageError(f"unknown lr_decay {self.lr_decay!r} (choose from {LR_DECAYS})")
        if self.dtype not in DTYPE_NAMES:
            raise UsageError(f"unknown dtype {self.dtype!r} (choose from {DTYPE_NAMES})")
        from unlearn.distributed import check_mode

        check_mode(self.distributed, self.optimizer)

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
