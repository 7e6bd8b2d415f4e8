"""Representation misdirection for unlearning (RMU; Li et al. 2024, "The WMDP Benchmark:
Measuring and Reducing Malicious Use With Unlearning").

    forget = MSE(h_l(θ, forget), c · u)              per token and hidden dimension
    retain = MSE(h_l(θ, retain), h_l(original, retain))

At one layer l the forget tokens' activations are pushed toward a fixed random direction u
(unit length, drawn once from `--direction_seed`) scaled by the steering coefficient c, which
scrambles everything downstream of them; the retain tokens' activations are held at the frozen
original's. Only the MLPs of layers l-2..l train (`--trained_layers` overrides), as in the
paper: the update stays local to where the activations are read. The coefficients are constant
(no ramp: `retain_ramp_start` and `forget_end_fraction` default to 1), the paper's
`loss = forget + α · retain` with α = retain_coef / remove_coef.

c must be large against the layer's activation norm: the paper's 6.5 was for Zephyr-7B's layer
7 (norms about 5-10 per dimension); on the mini world the default was calibrated (README).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from unlearn import losses
from unlearn.errors import UsageError
from unlearn.methods.base import Method, MethodConfig, MethodEnv, StepContext, run_forward
from unlearn.methods.registry import register

_MLP_PARAM = re.compile(r"\.(\d+)\.(mlp|feed_forward)\.")
"""A parameter inside block i's MLP (GPT-NeoX `layers.i.mlp.`, Llama `layers.i.mlp.`)."""


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
    direction_seed: int = 0
    """Seed of the random direction u."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.steering_coef > 0:
            raise UsageError(f"--steering_coef must be > 0, got {self.steering_coef}")
        if len(self.layers) > 1:
            raise UsageError(f"RMU steers one layer: give one --layers value, got {self.layers}")

    def check_layers(self, n_layers: int) -> None:
        super().check_layers(n_layers)
        bad = [i for i in self.trained_layers if not 0 <= i < n_layers]
        if bad:
            raise UsageError(f"--trained_layers {bad} outside the model's blocks 0..{n_layers - 1}")


def rmu_layer(n_layers: int) -> int:
    """The paper's layer 7 of 32, scaled to the depth (at least 2, so three MLPs can train)."""
    return min(n_layers - 1, max(2, round(n_layers * 7 / 32)))


@register
class RMU(Method):
    name = "rmu"
    config_cls = RMUConfig
    # Calibrated on the default world (README, issue 17): 512 steps at lr 1e-3, c = 20 and
    # retain_coef 20 reach forget 0.29 with every retain task within 0.05 of the target's;
    # retain_coef 5 wipes the retain facts too (0.25-0.31), 100 barely unlearns (0.76).
    train_defaults: ClassVar[dict] = {"lr": 1e-3, "lora": False, "num_train_examples": 4096}

    def setup(self, model: torch.nn.Module, env: MethodEnv) -> None:
        super().setup(model, env)
        self.layers = list(self.cfg.layers) or [rmu_layer(self.n_layers)]
        layer = self.layers[0]
        self.trained = sorted(self.cfg.trained_layers) or [i for i in (layer - 2, layer - 1, layer)
                                                           if i >= 0]  # fmt: skip
        d = model.config.hidden_size
        g = torch.Generator().manual_seed(self.cfg.direction_seed)
        u = torch.rand(d, generator=g)  # the paper's uniform draw, then normalised
        self.target = (self.cfg.steering_coef * u / u.norm()).to(env.device)

    def trainable(self, name: str) -> bool:
        m = _MLP_PARAM.search(name)
        return m is not None and int(m.group(1)) in self.trained

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
