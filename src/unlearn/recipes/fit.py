"""What `unlearn fit-lens` and `unlearn fit-affine` share before any weights load: the world,
the model (resolved against the world), the layers checked against its depth, and the general
text to fit on."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from unlearn.config.settings import ModelArgs
from unlearn.data import load_documents
from unlearn.errors import UsageError
from unlearn.models.refs import ModelRef, model_num_layers
from unlearn.readouts.fitting import general_texts
from unlearn.world import World, load_world


@dataclass
class FitInputs:
    """A fit's validated inputs; nothing heavy has been loaded."""

    world: World | None
    model: ModelRef
    """The model fitted (fit-lens) or mapped onto (fit-affine's target)."""
    layers: list[int]
    """Blocks (0-based outputs) to fit, inside the model's depth."""
    texts: list[str]
    """General text: --texts, or the world's retain + filler documents."""


def fit_inputs(
    world_dir: str | os.PathLike | None,
    model: ModelArgs,
    texts: str | None,
    layers: list[int],
    default_layers: Callable[[int], list[int]],
) -> FitInputs:
    """Load the world (if any), resolve `model` (default: the world's target), check `layers`
    (default: `default_layers(depth)`) and read the general text. UsageError on bad input."""
    world = load_world(world_dir) if world_dir else None
    ref = model.resolve(world, default=world.target if world is not None else None)
    n_layers = model_num_layers(ref)
    layers = list(layers) or default_layers(n_layers)
    if any(not 0 <= layer < n_layers for layer in layers):
        raise UsageError(f"--layers {layers} outside the model's blocks 0..{n_layers - 1}")
    docs = load_documents(texts) if texts else general_texts(world)
    return FitInputs(world, ref, layers, docs)
