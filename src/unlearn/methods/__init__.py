"""Unlearning methods, found by name in a registry (the trainer never branches on a name)."""

from __future__ import annotations

from unlearn.errors import UsageError
from unlearn.methods.base import Method, MethodConfig, StepContext

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise UsageError(f"unknown method {name!r} (choose from {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


# Importing the method modules registers them.
from unlearn.methods import checkpoint_transfer, lens, sequential  # noqa: E402, F401

__all__ = ["REGISTRY", "Method", "MethodConfig", "StepContext", "get_method", "register"]
