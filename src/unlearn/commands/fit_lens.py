"""`unlearn fit-lens`: train a tuned lens per layer for a model.

    unlearn fit-lens --model "$(jq -r .target /tmp/w/world.json)" --world /tmp/w --out /tmp/lens
    unlearn fit-lens --model MODEL --texts general.jsonl --out DIR --layers 5 10 15

Written in the tuned-lens library's format (config.json + params.pt), so a lens fitted here loads
in that library and a lens published in that format loads here (see unlearn.readouts.tuned_lens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.commands.arguments import ArgumentParser
from unlearn.config.settings import ModelArgs
from unlearn.errors import UsageError
from unlearn.fsutil import check_output_dir
from unlearn.models.load import default_device, load_model, load_tokenizer
from unlearn.readouts.fitting import text_batches
from unlearn.readouts.lens_files import SIDECAR, save_lens
from unlearn.readouts.lens_training import train_lens
from unlearn.readouts.tuned_lens import LENS_TYPE
from unlearn.recipes.fit import fit_inputs


@dataclass
class FitLensConfig:
    """Options of `unlearn fit-lens`."""

    out: str | None = None
    """Output directory for the lens."""
    model_args: ModelArgs = field(default_factory=ModelArgs)
    """The model (--model, --revision, --trust_remote_code); default: the world's target."""
    world: str | None = None
    """Mini world: default model and general text (retain + filler documents)."""
    texts: str | None = None
    """General-text corpus (a local file or hub ID[:CONFIG[:SPLIT]], see docs/models-and-data.md),
    instead of the world's."""
    layers: list[int] = field(default_factory=list)
    """Layers (block outputs) to fit; default: all but the last block (its lens is the identity)."""
    steps: int = 300
    """Optimisation steps (SGD with Nesterov momentum)."""
    lr: float = 1.0
    heldout_fraction: float = 0.2
    """Share of the documents held out to report the lens KL."""
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.out:
            raise UsageError("--out DIR is required")
        if self.world is None and (self.model_args.model is None or not self.texts):
            raise UsageError("without --world, give --model and --texts")
        if self.steps < 1 or self.lr <= 0:
            raise UsageError("--steps must be >= 1 and --lr > 0")
        if not 0 < self.heldout_fraction < 1:
            raise UsageError(f"--heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn fit-lens", description=__doc__)
    parser.add_arguments(FitLensConfig, dest="cfg")
    cfg: FitLensConfig = parser.parse_args(argv).cfg

    out = check_output_dir(cfg.out, "a lens directory", is_lens_dir)  # replaced only if ours
    fit = fit_inputs(cfg.world, cfg.model_args, cfg.texts, cfg.layers, lambda n: list(range(n - 1)))
    ref, texts = fit.model, fit.texts
    cut = max(1, int(len(texts) * cfg.heldout_fraction))
    if len(texts) - cut < 1:
        raise UsageError("too few documents to fit and hold out")

    device = default_device()
    tokenizer = load_tokenizer(ref)
    model = load_model(ref, cfg.dtype, device).requires_grad_(False)
    lens, stats = train_lens(
        model,
        text_batches(texts[cut:], tokenizer, device),
        fit.layers,
        cfg.steps,
        lr=cfg.lr,
        heldout=text_batches(texts[:cut], tokenizer, device),
    )
    save_lens(lens, out, model_name=ref.name, revision=ref.revision, stats=stats)
    print("| layer | held-out KL identity lens | held-out KL tuned lens |\n|---|---|---|")
    for layer in stats.layers:
        ident = stats.heldout_identity_kl.get(layer) if stats.heldout_identity_kl else None
        tuned = stats.heldout_kl.get(layer) if stats.heldout_kl else None
        print(f"| {layer} | {_fmt(ident)} | {_fmt(tuned)} |")
    print(f"wrote {out}")
    return 0


def is_lens_dir(path: Path) -> bool:
    """Whether `path` holds a lens and nothing else (what fit-lens writes, or a tuned-lens
    library lens): only the lens files, and a config.json that describes a lens. A model
    directory (config.json beside weights) or anything with the user's files is not one."""
    names = {p.name for p in path.iterdir()}
    if "config.json" not in names or not names <= {"config.json", "params.pt", SIDECAR}:
        return False
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (
        isinstance(config, dict)
        and config.get("lens_type", LENS_TYPE) == LENS_TYPE
        and "d_model" in config
    )


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
