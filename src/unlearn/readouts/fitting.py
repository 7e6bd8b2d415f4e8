"""Find or fit the helpers a method needs: affine maps (checkpoint transfer), tuned lenses (lens).

On the mini world they are fitted once and cached in the world directory (`WORLD/affine/...`,
`WORLD/lenses/...`), so a sweep fits them once, not once per run. Elsewhere, or when the world
directory cannot be written (a shared read-only copy), they are fitted into the run directory
(`OUT/affine/...`, `OUT/lenses/...`) unless a path is given.

A cache entry is named by a digest of everything the fit depends on: the model (name, revision
and, for a local directory, its weight files' sizes and times: `ModelRef.cache_key`), the
training dtype, the fitting and held-out text, and the fit's own settings. A lens fitted for one
revision, dtype or corpus is never served to another.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import random
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from unlearn.data import load_texts
from unlearn.data.batching import Batch, collate, tokenize_examples
from unlearn.distributed import is_main
from unlearn.errors import UsageError
from unlearn.models.modes import eval_mode
from unlearn.readouts.affine import fit_affine, load_affine, save_affine
from unlearn.readouts.lens_files import load_lens, save_lens
from unlearn.readouts.lens_training import train_lens

FIT_BATCH_SIZE = 16
FIT_MAX_LENGTH = 128


def general_texts(world, extra: list[str] | None = None, seed: int = 12345) -> list[str]:
    """General text of the mini world (retain + filler documents, no forget documents), shuffled.

    Lenses and affine maps are fitted on it: the affine maps must describe how the two models
    differ in general, not on the domain the source checkpoint has never seen.
    """
    texts = list(extra or [])
    if world is not None:
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


def _can_write(directory: Path) -> bool:
    """Whether a file can be created in `directory` (made if missing), by really writing one:
    mode bits say nothing for root, nor for a read-only mount."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError:
        return False
    return True


def _text_digest(*corpora: list[str]) -> str:
    """A digest of the fitting and held-out texts (lengths too, so no two splits collide)."""
    h = hashlib.sha256()
    for texts in corpora:
        h.update(f"{len(texts)}\n".encode())
        for text in texts:
            h.update(f"{len(text)}:".encode())
            h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _cache_dir(env, kind: str, key: dict, found: Callable[[Path], bool]) -> Path:
    """Where the `kind` fitted for `key` is (or goes): the world's cache when it holds it or can
    be written, else the run directory's (with one note line saying so)."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    run_cache = Path(env.out_dir) / kind / digest if env.out_dir is not None else None
    if env.world is None:
        if run_cache is None:
            raise UsageError(f"no run directory to cache the fitted {kind} in")
        return run_cache
    world_cache = Path(env.world.root) / kind / digest
    if found(world_cache) or _can_write(world_cache.parent):
        return world_cache
    if run_cache is None:
        raise UsageError(f"world {env.world.root} is not writable: cannot cache the fitted {kind}")
    if is_main():
        print(
            f"note: world {env.world.root} is not writable: the {kind} fitted for this run are"
            f" cached in {run_cache}",
            file=sys.stderr,
        )
    return run_cache


@contextlib.contextmanager
def _fitting(cache: Path) -> Iterator[None]:
    """Hold the cache entry's lock while checking for it and fitting it: sweep workers (or
    cluster jobs) that need the same lens at the same time fit it once, the others wait and
    load it. Without file locks (some network filesystems) each fits; saves stay atomic."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f".{cache.name}.lock", "a") as f:
        with contextlib.suppress(OSError):  # no lock support: fit anyway
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def fitted_affine(source, model, source_ref, env, layers: list[int], cfg):
    """Affine maps source -> model at `layers`, loaded from the cache or fitted (closed form)."""
    n = cfg.affine_examples
    fit_texts, heldout_texts = env.fit_texts[:n], env.heldout_texts[:n]
    key = {
        "source": source_ref.cache_key(),
        "target": env.model_ref.cache_key(),
        "dtype": env.dtype,
        "layers": sorted(layers),
        "alpha": cfg.affine_alpha,
        "examples": n,
        "texts": _text_digest(fit_texts, heldout_texts),
    }
    cache = _cache_dir(env, "affine", key, lambda d: (d / "metadata.json").exists())
    with _fitting(cache):
        if (cache / "metadata.json").exists():
            return load_affine(cache)
        fit = text_batches(fit_texts, env.tokenizer, env.device)
        heldout = text_batches(heldout_texts, env.tokenizer, env.device)
        with eval_mode(model):
            maps = fit_affine(source, model, fit, heldout, sorted(layers), cfg.affine_alpha)
        save_affine(maps, cache)
    print(f"fitted affine maps -> {cache} (held-out MSE {maps.heldout_mse})", file=sys.stderr)
    return maps


def fitted_lens(model, env, layers: list[int], steps: int):
    """A tuned lens for `model` covering `layers`, loaded from the cache or trained."""
    key = {
        "model": env.model_ref.cache_key(),
        "dtype": env.dtype,
        "steps": steps,
        "texts": _text_digest(env.fit_texts, env.heldout_texts),
    }

    def covering(directory: Path):
        """The cached lens in `directory` if it covers `layers` (else None: fit a deeper one)."""
        if not (directory / "config.json").exists():
            return None
        lens = load_lens(directory)
        return lens if set(layers) <= set(lens.layers) else None

    cache = _cache_dir(env, "lenses", key, lambda d: covering(d) is not None)
    with _fitting(cache):
        lens = covering(cache)
        if lens is not None:
            return lens
        batches = text_batches(env.fit_texts, env.tokenizer, env.device)
        heldout = text_batches(env.heldout_texts, env.tokenizer, env.device)
        fit_layers = list(range(max(layers) + 1))
        with eval_mode(model):
            lens, stats = train_lens(model, batches, fit_layers, steps, heldout=heldout)
        save_lens(lens, cache, model_name=env.model_name, revision=env.revision, stats=stats)
    print(f"fitted tuned lens -> {cache}", file=sys.stderr)
    return lens
