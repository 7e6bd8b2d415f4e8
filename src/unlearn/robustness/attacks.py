"""The attacks a robustness suite is made of, as suite files write them: fine-tuning attacks
(`FinetuneAttack`), the latent-space attack (`LatentAttack`) and the space the attack search
draws fine-tuning attacks from (`AttackSpace`). Each checks its fields when built: a bad value
or type in a suite file is one line (UsageError) naming the field, before anything loads.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from unlearn.config.settings import OPTIMIZERS
from unlearn.errors import UsageError
from unlearn.robustness.score import LATENT_NAME, latent_names

ATTACK_DATA = ("forget", "benign")


def _positive(value: Any) -> bool:
    """A number > 0 (not a bool, not nan)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def is_int(value: Any, minimum: int) -> bool:
    """An integer >= minimum (YAML's true/false are not integers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def layer_tuple(value: Any, what: str) -> tuple[int, ...]:
    """A non-empty list of block indices (integers >= 0) as a tuple; UsageError naming `what`
    otherwise (checked against the model's depth once it is known)."""
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"{what} must be a list of integers >= 0, got {value!r}")
    layers = tuple(value)
    if not layers or not all(is_int(x, 0) for x in layers):
        raise UsageError(f"{what} must be integers >= 0, got {list(layers)!r}")
    return layers


def check_plain_name(what: str, name: Any) -> None:
    """A name that becomes a folder (an attack's run directory, the suite's cache folder): a
    non-empty string with no path separator that does not start with a dot (no `..`)."""
    if (
        not isinstance(name, str)
        or not name
        or any(sep in name for sep in ("/", "\\", os.sep))
        or name.startswith(".")
    ):
        raise UsageError(
            f"{what} must be a plain name (no path separator, no leading dot), got {name!r}"
        )


def _fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


@dataclass(frozen=True)
class FinetuneAttack:
    """One fine-tuning attack of a suite."""

    data: str = "forget"
    """forget (forget-domain documents the model was not unlearned on) or benign (retain and
    filler text only)."""
    lr: float = 1e-3
    lora: bool = False
    """LoRA (every linear layer of the blocks, rank `lora_r`) instead of full fine-tuning."""
    lora_r: int = 16
    """The LoRA rank (with `lora`)."""
    steps: int = 60
    optimizer: str = "adamw"
    eval_every: int = 20
    pdbs: int = 16
    """Documents per optimizer step."""
    num_examples: int | None = None
    """Documents to train on (None: all of the attack corpus)."""
    name: str | None = None
    """Default: DATA-full|lora-lrLR[-muon]."""

    def __post_init__(self) -> None:
        if not isinstance(self.data, str) or self.data not in ATTACK_DATA:
            known = ", ".join(ATTACK_DATA)
            raise UsageError(f"attack data must be one of {known}, got {self.data!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise UsageError(f"attack lr must be > 0, got {self.lr!r}")
        for what in ("steps", "eval_every", "pdbs"):
            value = getattr(self, what)
            if not is_int(value, 1):
                raise UsageError(f"attack {what} must be an integer >= 1, got {value!r}")
        if self.num_examples is not None and not is_int(self.num_examples, 1):
            raise UsageError(
                f"attack num_examples must be an integer >= 1, got {self.num_examples!r}"
            )
        if not isinstance(self.lora, bool):
            raise UsageError(f"attack lora must be true or false, got {self.lora!r}")
        if not is_int(self.lora_r, 1):
            raise UsageError(f"attack lora_r must be an integer >= 1, got {self.lora_r!r}")
        if not isinstance(self.optimizer, str) or self.optimizer not in OPTIMIZERS:
            raise UsageError(
                f"attack optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.name is None:
            mode = ("lora" if self.lora_r == 16 else f"lora{self.lora_r}") if self.lora else "full"
            opt = "" if self.optimizer == "adamw" else f"-{self.optimizer}"
            object.__setattr__(self, "name", f"{self.data}-{mode}-lr{_fmt_lr(self.lr)}{opt}")
        check_plain_name("attack name", self.name)

    @property
    def family(self) -> str:
        """The scorecard column this attack counts in."""
        return f"finetune-{self.data}"

    def overrides(self) -> dict[str, Any]:
        """Its fields as attack-run config values (`build_attack_config`)."""
        values = {
            "lr": float(self.lr),
            "lora": self.lora,
            "max_steps": self.steps,
            "optimizer": self.optimizer,
            "eval_every": self.eval_every,
            "pdbs": self.pdbs,
            "grad_accum": 1,
            "warmup": 0.0,
            "num_train_examples": self.num_examples or 100_000,
        }
        if self.lora:
            values["lora_r"] = self.lora_r
        return values


@dataclass(frozen=True)
class AttackSpace:
    """Where the attack search looks (the defaults suit the mini world's models: a 60-step
    attack at lr 1e-3 recovers most of what the seed methods remove)."""

    lr: tuple[float, float] = (1e-5, 3e-2)
    """Learning-rate range, sampled log-uniformly."""
    steps: tuple[int, ...] = (30, 60, 120)
    """Attack lengths in optimizer steps."""
    lora_ranks: tuple[int, ...] = (0, 8, 32)
    """0 is full fine-tuning; others are LoRA ranks (every linear layer of the blocks)."""
    data: tuple[str, ...] = ATTACK_DATA
    eval_every: int = 10
    """Optimizer steps between evaluations of each trial's curve."""

    def __post_init__(self) -> None:
        for what in ("lr", "steps", "lora_ranks", "data"):  # YAML gives lists
            value = getattr(self, what)
            if not isinstance(value, (list, tuple)):
                raise UsageError(f"attack_space {what} must be a list, got {value!r}")
            object.__setattr__(self, what, tuple(value))
        if len(self.lr) != 2 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in self.lr
        ):
            raise UsageError(f"attack_space lr must be [low, high], got {list(self.lr)!r}")
        if not is_int(self.eval_every, 1):
            raise UsageError(
                f"attack_space eval_every must be an integer >= 1, got {self.eval_every!r}"
            )
        low, high = self.lr
        if not 0 < low <= high or not math.isfinite(high):
            raise UsageError(f"attack_space lr range must be 0 < low <= high, got {self.lr}")
        if not self.steps or any(not isinstance(s, int) or s < 1 for s in self.steps):
            raise UsageError(f"attack_space steps must be integers >= 1, got {self.steps}")
        if not self.lora_ranks or any(not isinstance(r, int) or r < 0 for r in self.lora_ranks):
            raise UsageError(
                f"attack_space lora_ranks must be integers >= 0 (0: full), got {self.lora_ranks}"
            )
        unknown = [d for d in self.data if d not in ATTACK_DATA]
        if not self.data or unknown:
            raise UsageError(f"attack_space data must be among {ATTACK_DATA}, got {self.data}")


@dataclass(frozen=True)
class LatentAttack:
    """The latent-space attack of a suite (`unlearn.robustness.latent`): one vector per attacked
    block, added to its output at every token, optimised by PGD on forget-domain documents of the
    attack group with the weights frozen, kept while the questions are scored."""

    layers: tuple[int, ...] | None = None
    """Blocks whose outputs are perturbed (None: those at 1/4, 1/2 and 3/4 of the depth)."""
    radius: float | tuple[float, ...] = 0.5
    """The L2 bound of each vector (every token gets the same one), as a fraction of the median
    per-token norm of its block's output on the attack documents. Several radii: one attack
    each (rows latent-r0.5, latent-r0.2, ...), so the family's worst case is the strongest
    perturbation that keeps the retain tasks within the utility margin."""
    steps: int = 100
    """PGD steps (one batch of documents each)."""
    lr: float = 0.1
    """Step length as a fraction of the bound, decayed linearly to 0 over the steps."""
    pdbs: int = 16
    """Documents per step."""
    num_examples: int | None = None
    """Documents to optimise on (None: all of the attack corpus)."""
    max_length: int = 256
    """Tokens per document (longer ones are cut), as the fine-tuning attacks cut them."""

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", layer_tuple(self.layers, "latent layers"))
        if isinstance(self.radius, (list, tuple)):
            radii = tuple(self.radius)
            if not radii or not all(_positive(r) for r in radii) or len(set(radii)) < len(radii):
                raise UsageError(
                    f"latent radius must be a number > 0 or a list of distinct ones, got {radii!r}"
                )
            # One radius in a list is that radius: the same attack, the same row and cache.
            object.__setattr__(self, "radius", radii[0] if len(radii) == 1 else radii)
        for what in ("radius", "lr"):
            value = getattr(self, what)
            if not isinstance(value, tuple) and not _positive(value):
                raise UsageError(f"latent {what} must be a number > 0, got {value!r}")
        for what in ("steps", "pdbs", "max_length"):
            if not is_int(getattr(self, what), 1):
                raise UsageError(
                    f"latent {what} must be an integer >= 1, got {getattr(self, what)!r}"
                )
        if self.num_examples is not None and not is_int(self.num_examples, 1):
            raise UsageError(
                f"latent num_examples must be an integer >= 1, got {self.num_examples!r}"
            )

    def by_row(self) -> dict[str, LatentAttack]:
        """{row name: the attack at one radius}: `latent` for a single radius, else
        latent-r0.5, latent-r0.2, ... in the order given."""
        if not isinstance(self.radius, tuple):
            return {LATENT_NAME: self}
        names = latent_names(self.radius)
        return {
            n: dataclasses.replace(self, radius=r) for n, r in zip(names, self.radius, strict=True)
        }
