"""Methods set up by hand on tiny models: seeded random affine maps, lenses and source models in
place of fitted ones (no world, no fitting), identical in every process that builds them."""

from __future__ import annotations

import torch
from torch import nn

from tiny_models import tiny_gpt_neox
from unlearn.methods.base import Method
from unlearn.methods.checkpoint_transfer import CheckpointTransfer, CheckpointTransferConfig
from unlearn.methods.lens import LensConfig, LensUnlearning
from unlearn.readouts.affine import AffineMaps
from unlearn.readouts.tuned_lens import TunedLens


def random_maps(layers: list[int], d: int = 32, seed: int = 3) -> AffineMaps:
    """A different map per layer, so a map applied at the wrong layer changes every value."""
    g = torch.Generator().manual_seed(seed)
    return AffineMaps(
        layers=layers,
        weights={i: 0.3 * torch.randn(d, d, generator=g) for i in layers},
        biases={i: torch.randn(d, generator=g) for i in layers},
        alpha=0.0,
        d_in=d,
        d_out=d,
        heldout_mse=dict.fromkeys(layers, 0.0),
        heldout_target_var=dict.fromkeys(layers, 1.0),
        source="source",
        target="target",
        fit_tokens=1,
        heldout_tokens=1,
    )


def random_lens(model: nn.Module, layers: list[int], seed: int = 5) -> TunedLens:
    """A lens for `model` with a different random translator per layer (frozen)."""
    lens = TunedLens.for_model(model, layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return lens.requires_grad_(False)


def transfer_method(
    model: nn.Module, cfg: CheckpointTransferConfig, source_seed: int = 1, **model_config
) -> CheckpointTransfer:
    """Checkpoint transfer from a random source model (4 blocks, `model_config` overrides)
    through random maps: what `setup` would load or fit."""
    method = CheckpointTransfer(cfg)
    Method.setup(method, model, None)  # depth and layers only
    method.source = tiny_gpt_neox(4, seed=source_seed, **model_config).requires_grad_(False)
    method.maps = random_maps(method.layers)
    return method


def lens_method(model: nn.Module, original: nn.Module, cfg: LensConfig) -> LensUnlearning:
    """Lens unlearning with a random lens shaped for `original` (what `setup` would fit)."""
    method = LensUnlearning(cfg)
    Method.setup(method, model, None)  # depth and layers only
    method.lens = random_lens(original, method.layers)
    return method
