"""Tuned lens: per-layer affine translators decoded by the model's own final norm and unembedding.

A tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned
Lens") reads a prediction out of an intermediate hidden state. For layer l (the output of block l,
as everywhere in this project; see `unlearn.hooks`) it computes

    logits_l(h) = unembed(final_norm(h + A_l h + b_l))

with A_l, b_l zero-initialised, so an untrained lens is the identity ("logit lens") and weight
decay pulls toward the identity rather than toward zero. The final norm and unembedding are the
model's own modules, called with detached parameters: gradients flow into h (the tuned-lens
unlearning method trains the model through them), never into the norm or unembedding.

Training minimises KL(p_final || p_lens_l), a masked token mean over valid tokens, p_final being
the model's own next-token distribution (detached). The model is frozen; one forward per batch
captures every requested layer. The optimizer follows the tuned-lens library's default, which its
authors found to work across model sizes with one setting: SGD with Nesterov momentum 0.9, the
learning rate scaled by (1 - momentum) so that lr = 1 is the usual value, weight decay 1e-3,
gradient-norm clipping at 1, linear decay of the learning rate to zero.

The last block needs no translator: its output goes straight into the final norm and unembedding,
so the identity lens reproduces the model's logits exactly and KL is already 0 (and its gradient
0, so training would leave it at the identity anyway). `TunedLens` accepts layer N-1 as this
fixed identity lens, with no parameters, and nothing is stored for it.

File format: the tuned-lens library's, so that lenses published in it (e.g. on the HF hub) load
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
and is the identity here, as explained above. Translators for layers a lens does not cover are
saved as zeros, i.e. as identity lenses.

Size: one module for the lens (module, training loop, tuned-lens file format) because the
format and the module must change together; ~430 lines.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from unlearn.errors import DivergedError, UsageError
from unlearn.fsutil import atomic_dir
from unlearn.hooks import cached_submodule, capture, get_blocks, num_layers
from unlearn.losses import kl_retain
from unlearn.models import eval_mode
from unlearn.schedules import lr_mult_at

LENS_TYPE = "linear_tuned_lens"
_FINAL_NORM_NAMES = ("final_layer_norm", "norm", "ln_f", "final_norm", "norm_f", "final_layernorm")
_LIBRARY_PREFIX = "layer_translators."
SIDECAR = "unlearn_lens.json"


def find_final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block (also through PEFT/DDP wrappers).

    Found generically: the shallowest module outside the block list whose attribute name is a
    usual final-norm name (GPT-NeoX `gpt_neox.final_layer_norm`, Llama `model.norm`, GPT-2
    `transformer.ln_f`). Searched once per model object (the lens method reads it per layer and
    micro-batch; `hooks.cached_submodule`).
    """
    return cached_submodule(model, "final_norm", _final_norm_path)


def _final_norm_path(model: nn.Module) -> str:
    inside_blocks = {id(m) for m in get_blocks(model).modules()}
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in _FINAL_NORM_NAMES and id(module) not in inside_blocks:
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, name)
    if best is None:
        raise ValueError(f"no final norm found in {type(model).__name__}")
    return best[1]


def _unembedding(model: nn.Module) -> nn.Module:
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings")
    return unembed


def _frozen_call(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)` with its parameters detached: gradients reach x but never the module."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, (x,))


class TunedLens(nn.Module):
    """Affine translators for the layers it covers; layer N-1 is the fixed identity lens."""

    def __init__(self, num_layers: int, d_model: int, layers: Sequence[int] | None = None) -> None:
        super().__init__()
        layers = range(num_layers) if layers is None else layers
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad:
            raise UsageError(f"lens layers {bad} outside the model's 0..{num_layers - 1}")
        self.num_layers = num_layers
        self.d_model = d_model
        self.layers = tuple(sorted(set(layers)))
        self.translators = nn.ModuleDict()
        for layer in self.layers:
            if layer < num_layers - 1:
                translator = nn.Linear(d_model, d_model)
                nn.init.zeros_(translator.weight)
                nn.init.zeros_(translator.bias)
                self.translators[str(layer)] = translator

    @classmethod
    def for_model(cls, model: nn.Module, layers: Sequence[int] | None = None) -> TunedLens:
        """Identity lens shaped for `model`, in float32 on the device of its unembedding."""
        weight = _unembedding(model).weight
        lens = cls(num_layers(model), weight.shape[-1], layers)
        return lens.to(weight.device)

    def has_translator(self, layer: int) -> bool:
        return str(layer) in self.translators

    def check_model(self, model: nn.Module) -> None:
        """UsageError unless the lens was made for a model of this depth and width."""
        n, d = num_layers(model), _unembedding(model).weight.shape[-1]
        if (n, d) != (self.num_layers, self.d_model):
            raise UsageError(
                f"lens is for {self.num_layers} layers of width {self.d_model}, "
                f"the model has {n} layers of width {d}"
            )

    def forward(self, h: Tensor, layer: int) -> Tensor:
        """Translated hidden state h + A_l h + b_l, returned in h's dtype."""
        if layer not in self.layers:
            raise ValueError(f"lens has no layer {layer} (it covers {list(self.layers)})")
        if not self.has_translator(layer):
            return h
        translator = self.translators[str(layer)]
        return h + translator(h.to(translator.weight.dtype)).to(h.dtype)

    def to_logits(self, model: nn.Module, h: Tensor, layer: int) -> Tensor:
        """Lens logits of block-`layer` outputs `h`: translator, model's final norm, unembedding."""
        normed = _frozen_call(find_final_norm(model), self(h, layer))
        return _frozen_call(_unembedding(model), normed)


def _ids_and_mask(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask of a dict batch or a `unlearn.data.batching.Batch`."""
    if isinstance(batch, Mapping):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        ids, mask = batch.input_ids, getattr(batch, "attention_mask", None)
    if mask is None:
        mask = torch.ones_like(ids)
    return ids.to(device), mask.to(device)


def _final_logits_and_hiddens(
    model: nn.Module, layers: Sequence[int], ids: Tensor, mask: Tensor
) -> tuple[Tensor, dict[int, Tensor]]:
    """One no-grad forward: the model's logits and the block outputs at `layers`."""
    with torch.no_grad(), capture(model, layers, detach=True) as hiddens:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits, dict(hiddens)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_lens(model: nn.Module, lens: TunedLens, batches: Iterable[Any]) -> dict[int, float]:
    """KL(p_final || p_lens) per layer in nats, token-weighted mean over all valid tokens."""
    device = _device(model)
    totals = dict.fromkeys(lens.layers, 0.0)
    tokens = 0
    for batch in batches:
        ids, mask = _ids_and_mask(batch, device)
        final, hiddens = _final_logits_and_hiddens(model, lens.layers, ids, mask)
        n = int(mask.sum())
        for layer in lens.layers:
            kl = kl_retain(final, lens.to_logits(model, hiddens[layer], layer), mask)
            totals[layer] += float(kl) * n
        tokens += n
    if tokens == 0:
        raise UsageError("no evaluation batches for the lens")
    return {layer: total / tokens for layer, total in totals.items()}


@dataclass
class LensTrainStats:
    """What `train_lens` did and how well the lens fits (KL in nats per token)."""

    layers: list[int]
    steps: int
    """Optimizer steps taken (fewer than asked only when a one-shot batch iterator ran out)."""
    passes: int
    """Passes over `batches` started (more than 1 means the same data was seen again)."""
    first_kl: dict[int, float]
    """KL on the first batch before any step: the identity (logit-lens) KL."""
    last_kl: dict[int, float]
    """Mean KL over the last (up to) 10 training batches."""
    heldout_kl: dict[int, float] | None = None
    heldout_identity_kl: dict[int, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cycle(batches: Iterable[Any], counter: list[int]) -> Iterator[tuple[int | None, Any]]:
    """Iterate `batches` again and again as (key, batch); stop when a pass yields nothing (a
    one-shot iterator). The key is the batch's index when `batches` is a sequence (the same
    batch every pass), else None: a generator's batches cannot be recognised again."""
    keyed = isinstance(batches, Sequence)
    while True:
        counter[0] += 1
        empty = True
        for i, batch in enumerate(batches):
            empty = False
            yield (i if keyed else None), batch
        if empty:
            counter[0] -= 1
            return


FROZEN_FORWARD_BYTES = 1 << 30
"""Memory for the frozen model's outputs (final logits and block outputs) kept while fitting a
lens: the model never changes, so a batch seen again in a later pass reuses its forward instead
of recomputing it (the same numbers, so the same lens). Batches past the budget (a large
vocabulary's logits) are recomputed each pass."""


class _FrozenForwards:
    """The frozen model's outputs per batch key, within a byte budget (see above)."""

    def __init__(self, model: nn.Module, layers: Sequence[int], budget: int) -> None:
        self.model, self.layers, self.budget = model, layers, budget
        self.kept: dict[int, tuple[Tensor, dict[int, Tensor]]] = {}
        self.used = 0

    def __call__(
        self, key: int | None, ids: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[int, Tensor]]:
        if key in self.kept:
            return self.kept[key]
        final, hiddens = _final_logits_and_hiddens(self.model, self.layers, ids, mask)
        size = sum(t.numel() * t.element_size() for t in (final, *hiddens.values()))
        if key is not None and self.used + size <= self.budget:
            self.kept[key] = (final, hiddens)
            self.used += size
        return final, hiddens


def _train_step(
    lens: TunedLens,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    frozen: tuple[Tensor, dict[int, Tensor]],
    mask: Tensor,
) -> dict[int, float]:
    """One optimizer step on one batch's frozen outputs; returns each layer's KL before it."""
    final, hiddens = frozen
    opt.zero_grad(set_to_none=True)
    kls = {}
    # One backward per layer keeps a single layer's lens logits alive at a time.
    for layer in lens.layers:
        kl = kl_retain(final, lens.to_logits(model, hiddens[layer], layer), mask)
        if lens.has_translator(layer):
            kl.backward()
        kls[layer] = float(kl.detach())
    torch.nn.utils.clip_grad_norm_(list(lens.parameters()), 1.0)
    opt.step()
    return kls


def train_lens(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Sequence[int],
    steps: int,
    lr: float = 1.0,
    progress: bool = True,
    *,
    heldout: Iterable[Any] | None = None,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
) -> tuple[TunedLens, LensTrainStats]:
    """Fit a tuned lens for `layers` of the frozen `model`, one optimizer step per batch.

    `batches` yields dicts with "input_ids" and optionally "attention_mask" (or `Batch`es); it is
    iterated again from the start when exhausted. If `heldout` is given, the trained and the
    identity lens are both evaluated on it.
    """
    if steps < 1:
        raise UsageError(f"lens training steps must be >= 1, got {steps}")
    if lr <= 0:
        raise UsageError(f"lens learning rate must be > 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise UsageError(f"lens momentum must be in [0, 1), got {momentum}")
    lens = TunedLens.for_model(model, layers)
    params = list(lens.parameters())
    if not params:
        raise UsageError("nothing to train: the last block's lens is the identity by definition")
    # The tuned-lens convention: torch's SGD momentum scales steps by 1 / (1 - momentum).
    base_lr = lr * (1.0 - momentum)
    opt = torch.optim.SGD(
        params, lr=base_lr, momentum=momentum, nesterov=True, weight_decay=weight_decay
    )
    device = _device(model)
    history: dict[int, list[float]] = {layer: [] for layer in lens.layers}
    frozen = _FrozenForwards(model, lens.layers, FROZEN_FORWARD_BYTES)
    first_kl: dict[int, float] = {}
    passes = [0]
    taken = 0
    with eval_mode(model), tqdm(total=steps, desc="tuned lens", disable=not progress) as bar:
        for step, (key, batch) in zip(range(steps), _cycle(batches, passes), strict=False):
            for group in opt.param_groups:
                group["lr"] = base_lr * lr_mult_at(step, steps, 0, "linear")
            ids, mask = _ids_and_mask(batch, device)
            kls = _train_step(lens, model, opt, frozen(key, ids, mask), mask)
            for layer, kl in kls.items():
                history[layer].append(kl)
            if step == 0:
                first_kl = kls
            taken += 1
            bar.update(1)
            bar.set_postfix(kl=f"{sum(h[-1] for h in history.values()) / len(history):.4f}")
    if taken == 0:
        raise UsageError("no training batches for the lens")
    stats = LensTrainStats(
        layers=list(lens.layers),
        steps=taken,
        passes=passes[0],
        first_kl=first_kl,
        last_kl={layer: sum(kls[-10:]) / len(kls[-10:]) for layer, kls in history.items()},
    )
    if not all(math.isfinite(kl) for kl in stats.last_kl.values()):
        raise DivergedError(f"tuned-lens training diverged: final KL {stats.last_kl}")
    if heldout is not None:
        heldout = list(heldout)
        stats.heldout_kl = evaluate_lens(model, lens, heldout)
        identity = TunedLens.for_model(model, lens.layers)
        stats.heldout_identity_kl = evaluate_lens(model, identity, heldout)
    lens.requires_grad_(False)
    return lens, stats


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
