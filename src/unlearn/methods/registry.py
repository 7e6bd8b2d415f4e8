"""The method registry: a method class registers itself by its `name`; the recipes, sweeps and
the CLI find it by name (the trainer never branches on a method's name). Every list of method
names (`unlearn run --help`, docs/methods.md's settings table, bench/step_cost.py, the tests
that run each method) is made from it, so a new method appears in all of them."""

from __future__ import annotations

from unlearn.config.settings import LoraSettings, TrainConfig
from unlearn.errors import UsageError
from unlearn.methods.base import SHARED_SETTINGS, Method

REGISTRY: dict[str, type[Method]] = {}
_TRAIN_DEFAULTS = {"lr": TrainConfig.lr, "lora": LoraSettings.lora}


def register(cls: type[Method]) -> type[Method]:
    uses = getattr(cls, "uses", None)
    if not isinstance(uses, tuple) or not set(uses) <= set(SHARED_SETTINGS):
        # A programming error: without the declaration a setting the method ignores would be
        # recorded and swept as if it changed the run.
        raise TypeError(
            f"method {cls.name} must declare `uses`, a tuple of the shared settings it reads"
            f" (of {', '.join(SHARED_SETTINGS)}); got {uses!r}"
        )
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise UsageError(f"unknown method {name!r} (choose from {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def method_names() -> list[str]:
    """Every registered method's name, sorted."""
    return sorted(REGISTRY)


def settings_table() -> str:
    """docs/methods.md's table of the shared settings each method does not read, and so refuses
    (a test checks that the page holds exactly this text: paste it there when one changes)."""
    rows = ["| method | shared settings it does not read (refused) |", "|---|---|"]
    for name in method_names():
        uses = REGISTRY[name].uses
        refused = ", ".join(f"`{s}`" for s in SHARED_SETTINGS if s not in uses) or "none"
        rows.append(f"| `{name}` | {refused} |")
    return "\n".join(rows) + "\n"


def methods_table() -> str:
    """The README's methods table: every registered method, its one-line summary and its
    default training mode (a test checks that the README holds exactly this text)."""
    rows = ["| method | what it does | default training |", "|---|---|---|"]
    for name in method_names():
        cls = REGISTRY[name]
        defaults = {**_TRAIN_DEFAULTS, **cls.train_defaults}
        mode = "LoRA" if defaults["lora"] else "full fine-tuning"
        rows.append(f"| `{name}` | {cls.summary} | {mode}, lr {defaults['lr']:g} |")
    return "\n".join(rows) + "\n"
