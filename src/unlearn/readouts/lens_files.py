"""The tuned-lens file format, shared with the tuned-lens library.

It is the tuned-lens library's, so that lenses published in it (e.g. on the HF hub) load
directly and lenses saved here load in that library. A lens is a directory with

- `config.json`: {"base_model_name_or_path": str, "d_model": int, "num_hidden_layers": N,
  "bias": true, "base_model_revision": str | null, "unembed_hash": null,
  "lens_type": "linear_tuned_lens"} (the library skips its unembedding-hash check when the hash
  is null);
- `params.pt`: a torch-saved dict with `"{i}.weight"` [d, d] and `"{i}.bias"` [d] for every
  translator i in 0..N-1 (the state dict of the library's `layer_translators` ModuleList; a
  `"layer_translators."` key prefix is also accepted when loading);
- `unlearn_lens.json` (ours; the library never reads it): {"layers": [the layers this lens
  covers], "stats": training statistics or null}. Without it (a lens from the library) every
  layer counts as covered. It lets `load_lens` tell a trained translator from an all-zero
  placeholder, so a cached lens fitted for layers 0..3 is never silently used as an identity
  lens at layer 5.

Index mapping, the off-by-one to get right: the library applies translator i to
`hidden_states[i]`, the *input* of block i (i = 0 is the embedding output). Our layer l is the
*output* of block l = `hidden_states[l + 1]`, so **our layer l is translator l + 1**. Translator 0
(the embeddings) has no layer here: it is saved as zeros (identity) and ignored when loading. Our
layer N-1 has no translator in the library (its `hidden_states[N]` is taken after the final norm)
and is the identity here (see `unlearn.readouts.tuned_lens`). Translators for layers a lens does
not cover are saved as zeros, i.e. as identity lenses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from unlearn.errors import UsageError
from unlearn.fsutil import atomic_dir
from unlearn.readouts.lens_training import LensTrainStats
from unlearn.readouts.tuned_lens import LENS_TYPE, TunedLens

_LIBRARY_PREFIX = "layer_translators."
SIDECAR = "unlearn_lens.json"


def _library_state(lens: TunedLens) -> dict[str, Tensor]:
    """The tuned-lens library's `layer_translators` state dict (translator i = our layer i-1)."""
    d = lens.d_model
    state: dict[str, Tensor] = {}
    for i in range(lens.num_layers):
        weight, bias = torch.zeros(d, d), torch.zeros(d)
        if i >= 1 and lens.has_translator(i - 1):
            translator = lens.translators[str(i - 1)]
            weight = translator.weight.detach().float().cpu().clone()
            bias = translator.bias.detach().float().cpu().clone()
        state[f"{i}.weight"], state[f"{i}.bias"] = weight, bias
    return state


def save_lens(
    lens: TunedLens,
    path: str | Path,
    model_name: str,
    revision: str | None = None,
    stats: LensTrainStats | None = None,
) -> Path:
    """Write `lens` to directory `path` atomically, in the tuned-lens library's format."""
    config = {
        "base_model_name_or_path": model_name,
        "d_model": lens.d_model,
        "num_hidden_layers": lens.num_layers,
        "bias": True,
        "base_model_revision": revision,
        "unembed_hash": None,
        "lens_type": LENS_TYPE,
    }
    with atomic_dir(path) as tmp:
        torch.save(_library_state(lens), tmp / "params.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        sidecar = {"layers": list(lens.layers), "stats": stats.as_dict() if stats else None}
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return Path(path)


def _covered_layers(path: Path, num_layers: int) -> list[int]:
    """Layers the lens at `path` was made for: from our sidecar, else all (a library lens)."""
    if not (path / SIDECAR).is_file():
        return list(range(num_layers))
    try:
        return [int(layer) for layer in json.loads((path / SIDECAR).read_text())["layers"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path}/{SIDECAR} is unreadable ({e})") from None


def _read_config(path: Path) -> tuple[int, int, bool]:
    try:
        config = json.loads((path / "config.json").read_text())
        n, d = int(config["num_hidden_layers"]), int(config["d_model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path}/config.json is not a tuned-lens config ({e})") from None
    lens_type = config.get("lens_type", LENS_TYPE)
    if lens_type != LENS_TYPE:
        raise UsageError(f"{path} holds a {lens_type!r} lens, only {LENS_TYPE!r} is supported")
    return n, d, bool(config.get("bias", True))


def check_lens_config(
    path: str | Path, num_layers: int, layers: Sequence[int], name: str | None = None
) -> None:
    """From config.json (and our sidecar) alone, no tensors: UsageError unless the lens at `path`
    (called `name` in messages) is for a model of `num_layers` blocks and covers `layers`."""
    path = Path(path)
    name = name or str(path)
    n, _, _ = _read_config(path)
    if n != num_layers:
        raise UsageError(f"the lens {name} is for {n} layers, the model has {num_layers}")
    missing = sorted(set(layers) - set(_covered_layers(path, n)))
    if missing:
        raise UsageError(f"the lens {name} has no translators for layers {missing}")


def load_lens(path: str | Path, layers: Sequence[int] | None = None) -> TunedLens:
    """Read a lens directory (saved here or by the tuned-lens library), frozen, on the CPU.

    `layers` picks the layers to load (default: all the lens covers; asking for one it does not
    cover is a UsageError). The lens comes back with
    `requires_grad=False` (unlearning methods use it as a fixed readout); call
    `requires_grad_(True)` to train it further. Check it against the model with `check_model`.
    """
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "params.pt").is_file():
        raise UsageError(f"{path} is not a tuned-lens directory (needs config.json and params.pt)")
    n, d, has_bias = _read_config(path)
    covered = _covered_layers(path, n)
    if layers is None:
        layers = covered
    missing = sorted(set(layers) - set(covered))
    if missing:
        raise UsageError(f"the lens at {path} covers layers {covered}, not {missing}")
    try:
        raw = torch.load(path / "params.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file can fail in any layer of torch's unpickler
        raise UsageError(f"cannot read {path}/params.pt: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, Mapping):
        raise UsageError(f"{path}/params.pt is not a state dict")
    state = {k.removeprefix(_LIBRARY_PREFIX): v for k, v in raw.items()}
    lens = TunedLens(n, d, layers)
    with torch.no_grad():
        for layer in lens.layers:
            if not lens.has_translator(layer):
                continue
            translator = lens.translators[str(layer)]
            key = f"{layer + 1}"
            weight = state.get(f"{key}.weight")
            bias = state.get(f"{key}.bias") if has_bias else torch.zeros(d)
            if weight is None or bias is None:
                raise UsageError(f"{path}/params.pt has no translator {key} (for layer {layer})")
            if tuple(weight.shape) != (d, d) or tuple(bias.shape) != (d,):
                raise UsageError(
                    f"{path}/params.pt translator {key} has shape {tuple(weight.shape)}, "
                    f"expected {(d, d)}"
                )
            translator.weight.copy_(weight)
            translator.bias.copy_(bias)
    return lens.requires_grad_(False)
