"""Representation misdirection for unlearning (RMU; Li et al. 2024, "The WMDP Benchmark:
Measuring and Reducing Malicious Use With Unlearning").

    forget = MSE(h_l(θ, forget), c · u)              per token and hidden dimension
    retain = MSE(h_l(θ, retain), h_l(original, retain))

At one layer l the forget tokens' activations are pushed toward a fixed random direction u
(unit length, drawn once from `--direction_seed`) scaled by the steering coefficient c, which
scrambles everything downstream of them; the retain tokens' activations are held at the frozen
original's. Only the MLP output projections of layers l-2..l train (Llama `down_proj`, GPT-NeoX
`dense_4h_to_h`; `--trained_layers` picks other blocks), as in the WMDP reference code, which
updates `param_ids [6]` of those layers, the MLP's down projection: the update stays local to
where the activations are read. `--trained_params mlp` trains every parameter of those MLPs
(gate, up and down projections) instead. The coefficients are constant (no ramp:
`retain_ramp_start` and `forget_end_fraction` default to 1), the paper's `loss = forget + α ·
retain` with α = retain_coef / remove_coef.

c must be large against the layer's activation norm: the paper's 6.5 was for Zephyr-7B's layer
7 (norms about 5-10 per dimension); on the mini world the default was calibrated (README).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from unlearn.errors import UsageError
from unlearn.methods.base import (
    SCHEDULED,
    Method,
    MethodConfig,
    MethodEnv,
    StepContext,
    run_forward,
)
from unlearn.methods.registry import register
from unlearn.models.lora import module_kinds
from unlearn.models.refs import ModelRef
from unlearn.training import losses

_MLP_PARAM = re.compile(r"\.(\d+)\.(?:mlp|feed_forward)\.([^.]+)")
"""A parameter (or module) inside block i's MLP, and the MLP's submodule it belongs to
(`gpt_neox.layers.1.mlp.dense_4h_to_h.weight`; with LoRA `...dense_4h_to_h.lora_A.default...`)."""
MLP_OUTPUT_PROJECTIONS = ("down_proj", "dense_4h_to_h", "c_proj", "fc2")
"""What an MLP's output projection (intermediate -> hidden) is called: Llama, Mistral, Qwen and
Gemma `down_proj`; GPT-NeoX and Falcon `dense_4h_to_h`; GPT-2 `c_proj`; Phi `fc2`."""
TRAINED_PARAMS = ("mlp_out", "mlp")


@dataclass
class RMUConfig(MethodConfig):
    retain_coef: float = 20.0
    retain_loss: str = "mse"
    retain_ramp_start: float = 1.0
    forget_end_fraction: float = 1.0
    steering_coef: float = 20.0
    """c: the length of the random target activation."""
    trained_layers: list[int] = field(default_factory=list)
    """Blocks whose MLPs train; default: l-2, l-1 and l (those that exist)."""
    trained_params: str = "mlp_out"
    """Which parameters of those MLPs train: mlp_out, the output projection only (`down_proj`,
    `dense_4h_to_h`; the WMDP reference code's), or mlp, every MLP parameter."""
    direction_seed: int = 0
    """Seed of the random direction u."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.steering_coef > 0:
            raise UsageError(f"--steering_coef must be > 0, got {self.steering_coef}")
        if len(self.layers) > 1:
            raise UsageError(f"RMU steers one layer: give one --layers value, got {self.layers}")
        if self.trained_params not in TRAINED_PARAMS:
            raise UsageError(
                f"unknown trained_params {self.trained_params!r} (choose from {TRAINED_PARAMS})"
            )

    def check_layers(self, n_layers: int) -> None:
        super().check_layers(n_layers)
        bad = [i for i in self.trained_layers if not 0 <= i < n_layers]
        if bad:
            raise UsageError(f"--trained_layers {bad} outside the model's blocks 0..{n_layers - 1}")

    def check_inputs(self, model: ModelRef, n_layers: int) -> None:
        # The parameters that would train, found from the model's config on the meta device: a
        # model whose MLPs are named otherwise is refused before its weights load.
        kinds = module_kinds(model)  # None: cannot be built so; checked in setup instead
        if kinds is not None:
            check_trained(self, kinds, trained_blocks(self, n_layers))

    def trains(self, name: str, blocks: list[int]) -> bool:
        """Whether the parameter (or module) `name` is one that trains in `blocks`."""
        m = _MLP_PARAM.search(name)
        if m is None or int(m.group(1)) not in blocks:
            return False
        return self.trained_params == "mlp" or m.group(2) in MLP_OUTPUT_PROJECTIONS


def rmu_layer(n_layers: int) -> int:
    """The paper's layer 7 of 32, scaled to the depth (at least 2, so three MLPs can train)."""
    return min(n_layers - 1, max(2, round(n_layers * 7 / 32)))


def trained_blocks(cfg: RMUConfig, n_layers: int) -> list[int]:
    """--trained_layers, else l-2, l-1 and l (those that exist) for the steered layer l."""
    layer = cfg.layers[0] if cfg.layers else rmu_layer(n_layers)
    return sorted(cfg.trained_layers) or [i for i in (layer - 2, layer - 1, layer) if i >= 0]


def check_trained(cfg: RMUConfig, names: Iterable[str], blocks: list[int]) -> None:
    """UsageError unless each of `blocks` has something to train among the model's parameter
    or module `names` (an architecture whose MLPs are named otherwise)."""
    found = {int(_MLP_PARAM.search(name).group(1)) for name in names  # type: ignore[union-attr]
             if cfg.trains(name, blocks)}  # fmt: skip
    missing = [b for b in blocks if b not in found]
    if not missing:
        return
    if cfg.trained_params == "mlp":
        raise UsageError(f"rmu: blocks {missing} of this model have no mlp or feed_forward module")
    raise UsageError(
        f"rmu: blocks {missing} of this model have no MLP output projection (looked for mlp."
        f"{', mlp.'.join(MLP_OUTPUT_PROJECTIONS)}); --trained_params mlp trains the whole MLPs"
    )


@register
class RMU(Method):
    name = "rmu"
    summary = (
        "push one layer's forget activations toward a scaled random direction"
        " (Li et al. 2024, WMDP)"
    )
    config_cls = RMUConfig
    uses = (*SCHEDULED, "layers")  # its forget term is an activation MSE, not forget_loss
    # Calibrated on the default world (docs/results/baselines):
    # 512 steps at lr 1e-3, c = 20 and
    # retain_coef 20 reach forget 0.29 with every retain task within 0.05 of the target's;
    # retain_coef 5 wipes the retain facts too (0.25-0.31), 100 barely unlearns (0.76). (These
    # were measured with the whole MLPs training, today's --trained_params mlp.)
    train_defaults: ClassVar[dict] = {"lr": 1e-3, "lora": False, "num_train_examples": 4096}

    def setup(self, model: torch.nn.Module, env: MethodEnv) -> None:
        super().setup(model, env)
        self.layers = list(self.cfg.layers) or [rmu_layer(self.n_layers)]
        self.trained = trained_blocks(self.cfg, self.n_layers)  # type: ignore[arg-type]
        # Checked again on the real names: a model that cannot be built on the meta device
        # (some remote code) is checked only now.
        check_trained(self.cfg, (n for n, _ in model.named_parameters()), self.trained)  # type: ignore[arg-type]
        d = model.config.hidden_size
        g = torch.Generator().manual_seed(self.cfg.direction_seed)
        u = torch.rand(d, generator=g)  # the paper's uniform draw, then normalised
        self.target = (self.cfg.steering_coef * u / u.norm()).to(env.device)

    def trainable(self, name: str) -> bool:
        return self.cfg.trains(name, self.trained)  # type: ignore[attr-defined]

    def default_retain_layers(self) -> list[int]:
        return list(self.layers)

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        layer, f = self.layers[0], ctx.forget
        h = run_forward(ctx.model, f, [layer], logits=False).hiddens[layer]
        target = self.target.to(h.dtype).expand_as(h)
        return {
            "forget": losses.activation_mse([h], [target], f.mask),
            "retain": self.retain(ctx),
        }

    def describe(self) -> dict:
        return {**super().describe(), "trained_layers": self.trained}
