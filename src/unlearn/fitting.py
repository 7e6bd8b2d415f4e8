"""Find or fit the helpers a method needs: affine maps (checkpoint transfer), tuned lenses (lens).

On the mini world they are fitted once and cached in the world directory (`WORLD/affine/...`,
`WORLD/lenses/...`), so a sweep fits them once, not once per run. Elsewhere they are fitted into
the run directory unless a path is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from unlearn.data.batching import Batch, collate, tokenize_examples
from unlearn.errors import UsageError

FIT_BATCH_SIZE = 16
FIT_MAX_LENGTH = 128


def general_texts(world, extra: list[str] | None = None, seed: int = 12345) -> list[str]:
    """General text of the mini world (retain + filler documents, no forget documents), shuffled.

    Lenses and affine maps are fitted on it: the affine maps must describe how the two models
    differ in general, not on the domain the source checkpoint has never seen.
    """
    import random

    texts = list(extra or [])
    if world is not None:
        from unlearn.data import load_texts

        if extra is None:
            texts += load_texts(world.corpora["retain"])
        texts += load_texts(world.corpora["filler"])
    random.Random(seed).shuffle(texts)
    return texts


def source_model_name(source: str | None, world) -> str:
    if source:
        return source
    if world is None:
        raise UsageError("--source is required outside the mini world (the early checkpoint)")
    return str(world.ignorant_checkpoint)


def text_batches(
    texts: list[str], tokenizer, device, batch_size: int = FIT_BATCH_SIZE
) -> list[dict]:
    examples = tokenize_examples(texts, tokenizer, FIT_MAX_LENGTH)
    pad = tokenizer.pad_token_id
    batches: list[Batch] = [
        collate(examples[i : i + batch_size], pad).to(device)
        for i in range(0, len(examples), batch_size)
    ]
    return [{"input_ids": b.input_ids, "attention_mask": b.attention_mask} for b in batches]


@contextlib.contextmanager
def _frozen_eval(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (no LoRA/attention dropout) for fitting, restoring the training mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _cache_dir(env, kind: str, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(env.world.root) if env.world is not None else Path(env.out_dir)
    return root / kind / digest


def fitted_affine(source, model, source_ref, env, layers: list[int], cfg):
    """Affine maps source -> model at `layers`, loaded from the cache or fitted (closed form)."""
    from unlearn.affine import fit_affine, load_affine, save_affine

    key = {
        "source": str(source_ref),
        "target": env.model_name,
        "layers": sorted(layers),
        "alpha": cfg.affine_alpha,
        "examples": cfg.affine_examples,
    }
    cache = _cache_dir(env, "affine", key)
    if (cache / "metadata.json").exists():
        return load_affine(cache)
    n = cfg.affine_examples
    fit = text_batches(env.fit_texts[:n], env.tokenizer, env.device)
    heldout = text_batches(env.heldout_texts[:n], env.tokenizer, env.device)
    with _frozen_eval(model):
        maps = fit_affine(source, model, fit, heldout, sorted(layers), cfg.affine_alpha)
    save_affine(maps, cache)
    print(f"fitted affine maps -> {cache} (held-out MSE {maps.heldout_mse})")
    return maps


def fitted_lens(model, env, layers: list[int], steps: int):
    """A tuned lens for `model` covering `layers`, loaded from the cache or trained."""
    from unlearn.lens import load_lens, save_lens, train_lens

    key = {"model": env.model_name, "steps": steps}
    cache = _cache_dir(env, "lenses", key)
    if (cache / "config.json").exists():
        lens = load_lens(cache)
        if set(layers) <= set(lens.layers):
            return lens
    batches = text_batches(env.fit_texts, env.tokenizer, env.device)
    heldout = text_batches(env.heldout_texts, env.tokenizer, env.device)
    fit_layers = list(range(max(layers) + 1))
    with _frozen_eval(model):
        lens, stats = train_lens(model, batches, fit_layers, steps, heldout=heldout)
    save_lens(lens, cache, model_name=env.model_name, stats=stats)
    print(f"fitted tuned lens -> {cache}")
    return lens
