"""The mini world: a seeded synthetic knowledge world and small GPT-NeoX models pretrained on it.

`build_world(preset, seed, out)` writes a world directory; `load_world(dir)` reads it back as a
`World` with absolute paths; `evaluate_world(model, tokenizer, world)` scores a model on its
question sets. See docs/world.md.
"""

from unlearn.world.build import build_world
from unlearn.world.load import World, load_world
from unlearn.world.presets import PRESETS, Preset, get_preset
from unlearn.world.scoring import WORLD_TASKS, evaluate_world

__all__ = [
    "PRESETS",
    "WORLD_TASKS",
    "Preset",
    "World",
    "build_world",
    "evaluate_world",
    "get_preset",
    "load_world",
]
