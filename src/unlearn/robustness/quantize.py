"""Quantisation attack: the model under test with the weights of its transformer blocks
quantised (weight-only, round to nearest), then scored on the held-out forget questions and on
every retain task, so a result says both what quantisation recovered and what it cost.

Zhang et al. 2024, "Catastrophic Failure of LLM Unlearning via Quantization" (arXiv 2410.16454):
unlearning under a utility constraint moves the weights so little that rounding them to a 4-bit
grid puts many back where the original model's weights round to; 4-bit quantisation of
unlearned models restored most of the forgotten knowledge (8-bit much less: its grid is fine
enough to keep the small update).

Schemes (`SCHEMES`), symmetric, one scale per group of weights:
- `int8`: 8 bits, one scale per output channel (the usual int8 weight-only scheme).
- `int4`: 4 bits, one scale per group of 128 consecutive input weights of an output channel. A
  layer whose input width is not a multiple of 128 gets the largest power-of-two group that
  divides its width (64 on a 64-wide layer of the tiny world); a layer with an odd width, one
  scale per output channel. `group_sizes` in the result says how many layers got which.

What is quantised: every `nn.Linear` inside the transformer blocks (the attention and MLP
projections: what GPTQ/AWQ/RTN toolchains quantise); the embeddings, norms and the unembedding
stay as loaded, as those toolchains keep them.

Library: torchao (PyTorch's own quantisation library), `IntxWeightOnlyConfig` with its unpacked
int8 storage. It is maintained, runs the same code on CPU and CUDA (it dequantises in plain
PyTorch, so it needs no custom kernel: checked on this project's CPU build for int8 and
int4-g128 on GPT-NeoX and Llama), and exposes each weight's integer values and scales, so a test
checks that every weight sits within half a quantisation step of its original. Its packed int4
path (`Int4WeightOnlyConfig`) needs CUDA/bf16 kernels from another package; optimum-quanto and
hqq were not needed once torchao covered both devices.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from unlearn.errors import UsageError
from unlearn.readouts.hooks import get_blocks


@dataclass(frozen=True)
class QuantScheme:
    """A weight-only quantisation scheme."""

    bits: int
    group_size: int | None
    """Input weights per scale (None: one scale per output channel)."""
    summary: str


SCHEMES: dict[str, QuantScheme] = {
    "int8": QuantScheme(8, None, "8-bit weights, one scale per output channel"),
    "int4": QuantScheme(4, 128, "4-bit weights, one scale per 128 input weights"),
}
"""Quantisation schemes by name (a suite's `quantize` list)."""


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """torchao logs a warning per optional C++ extension it cannot load (CUDA kernels on a CPU
    build) and torch one per enum it registers: noise on every run, for kernels the unpacked
    int8 storage never calls."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def library_version() -> str:
    """torchao's version; UsageError (one line) when it is not installed or does not import."""
    try:
        with _quiet_import():
            import torchao
            from torchao.quantization import IntxWeightOnlyConfig  # noqa: F401
    except Exception as e:  # ImportError, or a torchao built for another torch
        raise UsageError(
            f"the quantisation attack needs torchao (pip install torchao): {type(e).__name__}: {e}"
        ) from None
    return f"torchao {torchao.__version__}"


def group_size(width: int, scheme: QuantScheme) -> int | None:
    """Input weights per scale for a layer `width` inputs wide (None: one per output channel):
    the scheme's group, else the largest power of two dividing the width (module docstring)."""
    if scheme.group_size is None:
        return None
    group = scheme.group_size
    while group > 1 and width % group:
        group //= 2
    return None if group == 1 else group


def block_linears(model: nn.Module) -> list[nn.Linear]:
    """Every `nn.Linear` inside the model's transformer blocks, once each."""
    seen: dict[int, nn.Linear] = {}
    for block in get_blocks(model):
        for module in block.modules():
            if isinstance(module, nn.Linear):
                seen.setdefault(id(module), module)
    return list(seen.values())


def quantize_blocks(model: nn.Module, scheme_name: str) -> dict:
    """Quantise the block linears of `model` in place with the scheme `scheme_name`; returns
    {"scheme", "bits", "library", "layers", "group_sizes": {"128": n, "per_channel": n}}."""
    if scheme_name not in SCHEMES:
        raise UsageError(
            f"unknown quantisation scheme {scheme_name!r} (known: {', '.join(SCHEMES)})"
        )
    scheme = SCHEMES[scheme_name]
    library = library_version()
    with _quiet_import():
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup

    linears = block_linears(model)
    if not linears:
        raise ValueError("the model's blocks have no linear layer to quantise")
    by_group: dict[int | None, set[int]] = {}
    for linear in linears:
        by_group.setdefault(group_size(linear.in_features, scheme), set()).add(id(linear))
    dtype = getattr(torch, f"int{scheme.bits}")
    for group, ids in by_group.items():
        granularity = PerAxis(0) if group is None else PerGroup(group)
        config = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)
        quantize_(model, config, filter_fn=lambda m, _fqn, ids=ids: id(m) in ids)
    counts = {"per_channel" if g is None else str(g): len(ids) for g, ids in by_group.items()}
    return {"scheme": scheme_name, "bits": scheme.bits, "library": library,
            "layers": len(linears), "group_sizes": counts}  # fmt: skip
