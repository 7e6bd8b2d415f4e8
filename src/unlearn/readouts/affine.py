"""Closed-form ridge affine maps between two models' activations (checkpoint activation transfer).

For each target layer l, A_l(x) = x W_l + b_l maps the activations of a SOURCE model (a frozen
early checkpoint, ignorant of the forget domain) to those of the TARGET model at the same layer
and token. The transfer method then pulls the target's forget-data activations towards
A_l(h_l(source)).

Design choices:

- "Layer l" is the output of block l, captured with `unlearn.readouts.hooks.forward_hiddens` on both
  models, never read from `hidden_states` (whose last entry is after the final norm). The
  forward stops after the deepest requested block.
- The fit is one pass of sufficient statistics: count, sums, XᵀX and XᵀY accumulated in float64
  over valid tokens only, then centred and solved in closed form. No gradient descent, no
  learning rate, and the result does not depend on how the text was split into batches.
- Ridge strength `alpha` is *relative*: the penalty added to the diagonal is
  alpha * mean(diag(Cxx)), the mean per-dimension variance of the source activations. The same
  alpha then means the same amount of shrinkage for models whose activation scales differ by
  orders of magnitude (layers deeper in a residual stream grow), so one default fits all layers.
- Quality is measured on HELD-OUT text, never the fitting text: the MSE per token and hidden
  dimension (the same unit as `unlearn.training.losses.activation_mse`), and that MSE divided by the
  target's per-dimension variance on the held-out tokens (0 = exact, 1 = no better than
  predicting the mean activation).
- On disk, `weight` has shape [d_in, d_out] and the map is `x @ weight + bias` (the transpose of
  `nn.Linear`'s convention); `metadata.json` records this next to the numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from unlearn.errors import UsageError
from unlearn.fsutil import atomic_dir, atomic_write_json
from unlearn.models.modes import eval_mode
from unlearn.readouts.hooks import forward_hiddens, num_layers

FORMAT_KIND = "unlearn-affine-maps"
FORMAT_VERSION = 1
WEIGHTS_FILE = "affine.safetensors"
METADATA_FILE = "metadata.json"


class RidgeAccumulator:
    """Streaming sufficient statistics for a ridge regression y ≈ x W + b (float64).

    `update` takes rows that are already restricted to valid tokens; the statistics live on the
    device of the first update (so GPU activations are not copied to the host per batch).
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        if d_in <= 0 or d_out <= 0:
            raise ValueError(f"dimensions must be positive, got d_in={d_in}, d_out={d_out}")
        self.d_in = d_in
        self.d_out = d_out
        self.count = 0
        self.sum_x: Tensor | None = None
        self.sum_y: Tensor | None = None
        self.xtx: Tensor | None = None
        self.xty: Tensor | None = None

    def update(self, x: Tensor, y: Tensor) -> None:
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"need x [N, d_in] and y [N, d_out], got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        if x.shape[1] != self.d_in or y.shape[1] != self.d_out:
            raise ValueError(
                f"expected widths ({self.d_in}, {self.d_out}), got ({x.shape[1]}, {y.shape[1]})"
            )
        if self.xtx is None:
            device = x.device
            self.sum_x = torch.zeros(self.d_in, dtype=torch.float64, device=device)
            self.sum_y = torch.zeros(self.d_out, dtype=torch.float64, device=device)
            self.xtx = torch.zeros(self.d_in, self.d_in, dtype=torch.float64, device=device)
            self.xty = torch.zeros(self.d_in, self.d_out, dtype=torch.float64, device=device)
        x = x.detach().to(self.xtx.device, torch.float64)
        y = y.detach().to(self.xtx.device, torch.float64)
        self.count += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.xtx += x.T @ x
        self.xty += x.T @ y

    def solve(self, alpha: float) -> tuple[Tensor, Tensor]:
        """Ridge solution (W [d_in, d_out], b [d_out]) in float64, alpha relative (see module doc).

        Centring first means the bias is not penalised: b = mu_y - mu_x W exactly.
        """
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if self.count == 0 or self.xtx is None:
            raise ValueError("no tokens accumulated")
        assert self.sum_x is not None and self.sum_y is not None and self.xty is not None
        n = self.count
        mu_x = self.sum_x / n
        mu_y = self.sum_y / n
        cxx = self.xtx / n - torch.outer(mu_x, mu_x)
        cxy = self.xty / n - torch.outer(mu_x, mu_y)
        penalty = alpha * cxx.diagonal().mean()
        eye = torch.eye(self.d_in, dtype=torch.float64, device=cxx.device)
        try:
            w = torch.linalg.solve(cxx + penalty * eye, cxy)
        except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
            raise ValueError(
                f"ridge system is singular ({n} tokens, {self.d_in} dims, alpha={alpha}): "
                "use alpha > 0 or more fitting text"
            ) from e
        return w, mu_y - mu_x @ w


@dataclass
class AffineMaps:
    """Fitted maps A_l(x) = x @ weights[l] + biases[l], one per layer, with held-out quality."""

    layers: list[int]
    weights: dict[int, Tensor]
    """Per layer, float32 [d_in, d_out]."""
    biases: dict[int, Tensor]
    """Per layer, float32 [d_out]."""
    alpha: float
    """Ridge strength relative to the mean per-dimension variance of the source activations."""
    d_in: int
    d_out: int
    heldout_mse: dict[int, float]
    """Per layer, held-out squared error per token and hidden dimension."""
    heldout_target_var: dict[int, float]
    """Per layer, mean per-dimension variance of the target activations on the held-out tokens."""
    source: str
    target: str
    fit_tokens: int
    heldout_tokens: int
    _cast: dict[tuple[int, torch.device, torch.dtype], tuple[Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise UsageError(f"affine maps need distinct layers, got {self.layers}")
        if self.alpha < 0:
            raise UsageError(f"affine alpha must be >= 0, got {self.alpha}")
        for name in ("weights", "biases", "heldout_mse", "heldout_target_var"):
            if set(getattr(self, name)) != set(self.layers):
                raise UsageError(f"affine maps: {name} layers do not match {self.layers}")
        for layer in self.layers:
            w, b = self.weights[layer], self.biases[layer]
            if tuple(w.shape) != (self.d_in, self.d_out) or tuple(b.shape) != (self.d_out,):
                raise UsageError(
                    f"affine maps layer {layer}: weight {tuple(w.shape)} / bias {tuple(b.shape)} "
                    f"do not match d_in={self.d_in}, d_out={self.d_out}"
                )

    @property
    def heldout_relative_mse(self) -> dict[int, float]:
        """Held-out MSE / target variance per layer (0 = exact, 1 = as good as the mean)."""
        return {
            layer: self.heldout_mse[layer] / self.heldout_target_var[layer]
            if self.heldout_target_var[layer] > 0
            else float("inf")
            for layer in self.layers
        }

    def digest(self, layers: Sequence[int]) -> str:
        """A digest of the maps' weights and biases at `layers`: what transferred targets cached
        by unlearn.training.frozen_cache are keyed by (the same file path may hold refitted
        maps)."""
        h = hashlib.sha256()
        for layer in layers:
            for t in (self.weights[layer], self.biases[layer]):
                h.update(f"{layer}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:32]

    def apply(self, layer: int, x: Tensor) -> Tensor:
        """A_layer(x) = x @ W + b, computed in x's dtype on x's device."""
        if layer not in self.weights:
            raise KeyError(f"no affine map for layer {layer} (have {self.layers})")
        key = (layer, x.device, x.dtype)
        if key not in self._cast:
            # Cached so a training loop does not copy the weights to the device every step.
            self._cast[key] = (
                self.weights[layer].to(x.device, x.dtype),
                self.biases[layer].to(x.device, x.dtype),
            )
        w, b = self._cast[key]
        return x @ w + b


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "name_or_path", "") or type(model).__name__)


def _paired_rows(
    source_model: nn.Module, target_model: nn.Module, batch: dict[str, Tensor], layers: list[int]
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(layer, source rows, target rows) at one batch's valid tokens, on the target's device."""
    if "input_ids" not in batch or "attention_mask" not in batch:
        raise UsageError("affine fitting batches need input_ids and attention_mask")
    device = _model_device(target_model)
    hiddens = []
    for model in (source_model, target_model):
        dev = _model_device(model)
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        hiddens.append(forward_hiddens(model, ids, mask, layers))
    valid = batch["attention_mask"].to(device) != 0
    for layer in layers:
        x = hiddens[0][layer].to(device)[valid]
        y = hiddens[1][layer][valid]
        yield layer, x, y


class _HeldoutError:
    """Streams one fitted map's squared error and its targets' variance over held-out rows."""

    def __init__(self, w: Tensor, b: Tensor) -> None:
        self.w, self.b = w, b
        self.count = 0
        self.sq_err = torch.zeros((), dtype=torch.float64, device=w.device)
        self.y_sum = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
        self.y_sq_sum = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)

    def update(self, x: Tensor, y: Tensor) -> None:
        y = y.double()
        self.count += x.shape[0]
        self.sq_err += (x.double() @ self.w + self.b - y).square().sum()
        self.y_sum += y.sum(0)
        self.y_sq_sum += y.square().sum(0)

    def mse(self) -> float:
        """Squared error per token and output dimension."""
        return self.sq_err.item() / (self.count * self.w.shape[1])

    def target_var(self) -> float:
        """Per-dimension variance of the targets, averaged over dimensions."""
        mean = self.y_sum / self.count
        return (self.y_sq_sum / self.count - mean.square()).mean().item()


def fit_affine(
    source_model: nn.Module,
    target_model: nn.Module,
    fit_batches: Iterable[dict[str, Tensor]],
    heldout_batches: Iterable[dict[str, Tensor]],
    layers: Sequence[int],
    alpha: float,
    progress: bool = False,
    source: str | None = None,
    target: str | None = None,
) -> AffineMaps:
    """Fit A_l from source to target activations per layer; report MSE on `heldout_batches`.

    Both models see the same token ids, so they must share a tokenizer. The models are run
    frozen (no_grad, eval mode, then restored). `source`/`target` name the models in the
    metadata (default: their config's name_or_path). Keeping the held-out text disjoint from
    the fitting text is the caller's job.
    """
    wanted = sorted(set(layers))
    if not wanted:
        raise UsageError("affine fitting needs at least one layer")
    if alpha < 0:
        raise UsageError(f"affine alpha must be >= 0, got {alpha}")
    for name, model in (("source", source_model), ("target", target_model)):
        n = num_layers(model)
        if wanted[0] < 0 or wanted[-1] >= n:
            raise UsageError(f"layers {wanted} out of range for the {name} model ({n} blocks)")

    accs: dict[int, RidgeAccumulator] = {}
    errors: dict[int, _HeldoutError] = {}
    with torch.no_grad(), eval_mode(source_model), eval_mode(target_model):
        for batch in tqdm(fit_batches, desc="affine fit", disable=not progress):
            for layer, x, y in _paired_rows(source_model, target_model, batch, wanted):
                accs.setdefault(layer, RidgeAccumulator(x.shape[1], y.shape[1])).update(x, y)
        if not accs or accs[wanted[0]].count == 0:
            raise UsageError("affine fitting batches contain no valid tokens")
        for layer in wanted:
            errors[layer] = _HeldoutError(*accs[layer].solve(alpha))
        for batch in tqdm(heldout_batches, desc="affine held-out", disable=not progress):
            for layer, x, y in _paired_rows(source_model, target_model, batch, wanted):
                errors[layer].update(x, y)
    if errors[wanted[0]].count == 0:
        raise UsageError("affine held-out batches contain no valid tokens")

    return AffineMaps(
        layers=wanted,
        weights={layer: errors[layer].w.float().cpu() for layer in wanted},
        biases={layer: errors[layer].b.float().cpu() for layer in wanted},
        alpha=float(alpha),
        d_in=accs[wanted[0]].d_in,
        d_out=accs[wanted[0]].d_out,
        heldout_mse={layer: errors[layer].mse() for layer in wanted},
        heldout_target_var={layer: errors[layer].target_var() for layer in wanted},
        source=source if source is not None else _model_name(source_model),
        target=target if target is not None else _model_name(target_model),
        fit_tokens=accs[wanted[0]].count,
        heldout_tokens=errors[wanted[0]].count,
    )


def save_affine(maps: AffineMaps, out_dir: str | os.PathLike) -> Path:
    """Write `affine.safetensors` + `metadata.json` into `out_dir` atomically; return its path."""
    tensors = {}
    for layer in maps.layers:
        tensors[f"layers.{layer}.weight"] = maps.weights[layer].float().contiguous().cpu()
        tensors[f"layers.{layer}.bias"] = maps.biases[layer].float().contiguous().cpu()
    metadata = {
        "kind": FORMAT_KIND,
        "format": FORMAT_VERSION,
        "convention": "y = x @ weight + bias, weight [d_in, d_out]",
        "layers": maps.layers,
        "d_in": maps.d_in,
        "d_out": maps.d_out,
        "alpha": maps.alpha,
        "alpha_is_relative_to": "mean(diag(Cxx))",
        "source": maps.source,
        "target": maps.target,
        "fit_tokens": maps.fit_tokens,
        "heldout_tokens": maps.heldout_tokens,
        "heldout_mse": {str(k): v for k, v in maps.heldout_mse.items()},
        "heldout_target_var": {str(k): v for k, v in maps.heldout_target_var.items()},
        "heldout_relative_mse": {str(k): v for k, v in maps.heldout_relative_mse.items()},
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        atomic_write_json(tmp / METADATA_FILE, metadata)
    return Path(out_dir).expanduser().absolute()


def load_affine(path: str | os.PathLike) -> AffineMaps:
    """Read a directory written by `save_affine` (tensors on CPU); UsageError if it is not one."""
    path = Path(path)
    meta_path, weights_path = path / METADATA_FILE, path / WEIGHTS_FILE
    if not meta_path.is_file():
        raise UsageError(f"{path} is not an affine-maps directory (no {METADATA_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{meta_path}: unreadable affine metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != FORMAT_KIND:
        raise UsageError(f"{path} is not an affine-maps directory (kind is not {FORMAT_KIND})")
    if meta.get("format") != FORMAT_VERSION:
        raise UsageError(f"{path}: affine-maps format {meta.get('format')} is not {FORMAT_VERSION}")
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as e:
        raise UsageError(f"{weights_path}: unreadable affine weights ({e})") from None
    try:
        layers = [int(layer) for layer in meta["layers"]]
        return AffineMaps(
            layers=layers,
            weights={layer: tensors[f"layers.{layer}.weight"] for layer in layers},
            biases={layer: tensors[f"layers.{layer}.bias"] for layer in layers},
            alpha=float(meta["alpha"]),
            d_in=int(meta["d_in"]),
            d_out=int(meta["d_out"]),
            heldout_mse={int(k): float(v) for k, v in meta["heldout_mse"].items()},
            heldout_target_var={int(k): float(v) for k, v in meta["heldout_target_var"].items()},
            source=str(meta["source"]),
            target=str(meta["target"]),
            fit_tokens=int(meta["fit_tokens"]),
            heldout_tokens=int(meta["heldout_tokens"]),
        )
    except KeyError as e:
        raise UsageError(f"{path}: incomplete affine maps (missing {e})") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"{path}: malformed affine metadata ({e})") from None
