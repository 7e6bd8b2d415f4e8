"""The method registry: a method class registers itself by its `name`; the recipes, sweeps and
the CLI find it by name (the trainer never branches on a method's name)."""

from __future__ import annotations

from unlearn.errors import UsageError
from unlearn.methods.base import Method

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise UsageError(f"unknown method {name!r} (choose from {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]
