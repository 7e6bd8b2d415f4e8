"""`unlearn fit-affine`: closed-form ridge affine maps from a source checkpoint to a target model.

    unlearn fit-affine --world /tmp/w --out /tmp/affine            # ignorant checkpoint -> target
    unlearn fit-affine --source CKPT --target MODEL --texts general.jsonl --out DIR --layers 5 10

Fitted on general text (the world's retain + filler documents), with the MSE reported on other,
held-out documents. Writes affine.safetensors + metadata.json (see unlearn.readouts.affine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.commands.arguments import ArgumentParser
from unlearn.config.settings import ModelArgs
from unlearn.errors import UsageError
from unlearn.fsutil import check_output_dir
from unlearn.methods.base import default_layers
from unlearn.models.load import default_device, load_model, load_tokenizer
from unlearn.readouts.affine import (
    FORMAT_KIND,
    METADATA_FILE,
    WEIGHTS_FILE,
    fit_affine,
    save_affine,
)
from unlearn.readouts.fitting import text_batches
from unlearn.recipes.fit import fit_inputs


# Not a ModelArgs section: it names two models (--source and --target, each with its own
# revision); each is resolved through a ModelArgs of its own.
@dataclass
class FitAffineConfig:
    """Options of `unlearn fit-affine`."""

    out: str | None = None
    """Output directory for the maps."""
    world: str | None = None
    """Mini world: default source (ignorant checkpoint), target and general text."""
    source: str | None = None
    """Source checkpoint (dir or hub id)."""
    source_revision: str | None = None
    target: str | None = None
    """Target model (dir or hub id)."""
    revision: str | None = None
    """Hub revision of the target."""
    texts: str | None = None
    """General-text corpus (a local file or hub ID[:CONFIG[:SPLIT]], see docs/models-and-data.md);
    default: the world's retain + filler documents."""
    layers: list[int] = field(default_factory=list)
    """Layers (block outputs) to map; default: the methods' default layers for the depth."""
    alpha: float = 1e-2
    """Ridge strength, relative to the mean source variance."""
    examples: int = 512
    """Documents to fit on (as many more are held out for the MSE)."""
    dtype: str = "float32"
    trust_remote_code: bool = False
    """Let the model(s) run their own modelling code from the hub (off: it executes downloaded
    code)."""

    def __post_init__(self) -> None:
        if not self.out:
            raise UsageError("--out DIR is required")
        if self.world is None and (self.source is None or self.target is None or not self.texts):
            raise UsageError("without --world, give --source, --target and --texts")
        if self.alpha < 0:
            raise UsageError(f"--alpha must be >= 0, got {self.alpha}")
        if self.examples < 1:
            raise UsageError(f"--examples must be >= 1, got {self.examples}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn fit-affine", description=__doc__)
    parser.add_arguments(FitAffineConfig, dest="cfg")
    cfg: FitAffineConfig = parser.parse_args(argv).cfg

    out = check_output_dir(cfg.out, "an affine-maps directory", is_affine_dir)  # ours only
    trust = cfg.trust_remote_code
    target_args = ModelArgs(cfg.target, cfg.revision, trust)
    inputs = fit_inputs(cfg.world, target_args, cfg.texts, cfg.layers, default_layers)
    world, target, layers, texts = inputs.world, inputs.model, inputs.layers, inputs.texts
    default_source = world.ignorant_checkpoint if world is not None else None
    source = ModelArgs(cfg.source, cfg.source_revision, trust).resolve(world, default_source)

    tokenizer = load_tokenizer(target)
    fit, heldout = texts[cfg.examples :][: cfg.examples], texts[: cfg.examples]
    if not fit:
        raise UsageError(f"need more than --examples={cfg.examples} documents to hold some out")
    device = default_device()
    src_model = load_model(source, cfg.dtype, device)
    tgt_model = load_model(target, cfg.dtype, device)
    maps = fit_affine(
        src_model,
        tgt_model,
        text_batches(fit, tokenizer, device),
        text_batches(heldout, tokenizer, device),
        layers,
        cfg.alpha,
        progress=True,
        source=str(source),
        target=str(target),
    )
    save_affine(maps, out)
    print("| layer | held-out MSE | relative MSE |\n|---|---|---|")
    for layer in maps.layers:
        rel = maps.heldout_relative_mse[layer]
        print(f"| {layer} | {maps.heldout_mse[layer]:.4g} | {rel:.3f} |")
    print(f"wrote {out}")
    return 0


def is_affine_dir(path: Path) -> bool:
    """Whether `path` holds affine maps and nothing else (what fit-affine writes): only its two
    files, and metadata.json of the affine-maps kind."""
    names = {p.name for p in path.iterdir()}
    if METADATA_FILE not in names or not names <= {METADATA_FILE, WEIGHTS_FILE}:
        return False
    try:
        meta = json.loads((path / METADATA_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("kind") == FORMAT_KIND
