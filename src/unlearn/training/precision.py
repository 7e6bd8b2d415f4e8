"""Mixed precision: autocast to bf16 or fp16 over float32 master weights.

The weights and the optimizer state stay in float32 (`--dtype float32`); under autocast the
matrix multiplications of every forward, frozen models' included, run in the compute dtype, so
an update smaller than bf16's resolution still accumulates in the master weights. fp16's
narrow exponent range needs a gradient scaler: the loss is scaled before backward, gradients
are unscaled before clipping, and a step whose gradients overflowed is skipped while the scale
shrinks. The scaler's state is part of the training state, so a resumed run continues with
the scale it had. Under FSDP2 the same compute dtype is FSDP2's mixed-precision policy
(`distributed.Parallel.wrap`), with gradients reduced in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from unlearn.training.optim import torch_optimizers

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """How one training run computes: `mode` is --mixed_precision (no, bf16, fp16)."""

    def __init__(self, mode: str, device: torch.device | str) -> None:
        self.mode = mode
        self.device_type = torch.device(device).type
        self.dtype = COMPUTE_DTYPES.get(mode)
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward passes of one micro-batch (backward runs outside, as autocast wants)."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: Any) -> None:
        """Gradients back to their true size, before they are clipped or their norm logged."""
        if self.scaler is not None:
            for opt in torch_optimizers(optimizer):
                self.scaler.unscale_(opt)

    def step(self, optimizer: Any) -> None:
        """The optimizer step (skipped by the scaler when fp16 gradients overflowed)."""
        if self.scaler is None:
            optimizer.step()
            return
        for opt in torch_optimizers(optimizer):
            self.scaler.step(opt)
        self.scaler.update()

    def state(self) -> dict[str, Any] | None:
        """The scaler's state (JSON-able), kept in the training state for resuming."""
        if self.scaler is None:
            return None
        return {k: float(v) if k == "scale" else v for k, v in self.scaler.state_dict().items()}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def match_frozen_copy(frozen: torch.nn.Module, mixed_precision: str, distributed: str):
    """A frozen copy of the trained model (the full fine-tuning reference), made to compute as
    the trained model does at the same weights.

    Under FSDP2's bf16 policy the trained model computes with its parameters rounded to bf16,
    so the copy is stored in bf16 too (half the memory as well). Elsewhere autocast treats both
    models alike and the copy keeps the weights' dtype. Any mismatch matters: an L2 retain term
    has a gradient of full size at any nonzero distance, so rounding differences between the
    two would pull the model as hard as real drift does.
    """
    if distributed == "fsdp2" and mixed_precision in COMPUTE_DTYPES:
        return frozen.to(COMPUTE_DTYPES[mixed_precision])
    return frozen
