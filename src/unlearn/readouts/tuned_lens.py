"""Tuned lens: per-layer affine translators decoded by the model's own final norm and unembedding.

A tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned
Lens") reads a prediction out of an intermediate hidden state. For layer l (the output of block l,
as everywhere in this project; see `unlearn.readouts.hooks`) it computes

The last block needs no translator: its output goes straight into the final norm and unembedding,
so the identity lens reproduces the model's logits exactly and KL is already 0 (and its gradient
0, so training would leave it at the identity anyway). `TunedLens` accepts layer N-1 as this
fixed identity lens, with no parameters, and nothing is stored for it.

Training: `unlearn.readouts.lens_training`; the file format: `unlearn.readouts.lens_files`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from unlearn.errors import UsageError
from unlearn.readouts.hooks import cached_submodule, capture, get_blocks, num_layers
from unlearn.training.losses import kl_retain

LENS_TYPE = "linear_tuned_lens"
_FINAL_NORM_NAMES = ("final_layer_norm", "norm", "ln_f", "final_norm", "norm_f", "final_layernorm")


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


def ids_and_mask(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask of a dict batch or a `unlearn.data.batching.Batch`."""
    if isinstance(batch, Mapping):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        ids, mask = batch.input_ids, getattr(batch, "attention_mask", None)
    if mask is None:
        mask = torch.ones_like(ids)
    return ids.to(device), mask.to(device)


def final_logits_and_hiddens(
    model: nn.Module, layers: Sequence[int], ids: Tensor, mask: Tensor
) -> tuple[Tensor, dict[int, Tensor]]:
    """One no-grad forward: the model's logits and the block outputs at `layers`."""
    with torch.no_grad(), capture(model, layers, detach=True) as hiddens:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits, dict(hiddens)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_lens(model: nn.Module, lens: TunedLens, batches: Iterable[Any]) -> dict[int, float]:
    """KL(p_final || p_lens) per layer in nats, token-weighted mean over all valid tokens."""
    device = model_device(model)
    totals = dict.fromkeys(lens.layers, 0.0)
    tokens = 0
    for batch in batches:
        ids, mask = ids_and_mask(batch, device)
        final, hiddens = final_logits_and_hiddens(model, lens.layers, ids, mask)
        n = int(mask.sum())
        for layer in lens.layers:
            kl = kl_retain(final, lens.to_logits(model, hiddens[layer], layer), mask)
            totals[layer] += float(kl) * n
        tokens += n
    if tokens == 0:
        raise UsageError("no evaluation batches for the lens")
    return {layer: total / tokens for layer, total in totals.items()}
