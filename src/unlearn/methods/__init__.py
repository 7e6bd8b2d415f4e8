"""Unlearning methods, one file each, found by name in a registry (the trainer never branches on
a name). Importing this package imports every method module, which registers it."""

from __future__ import annotations

from unlearn.methods import checkpoint_transfer, grad_diff, lens, npo, rmu, rr, sequential, simnpo
from unlearn.methods.base import Method, MethodConfig, StepContext
from unlearn.methods.registry import REGISTRY, get_method, register

METHODS = (checkpoint_transfer, lens, sequential, grad_diff, npo, simnpo, rmu, rr)
"""The method modules (imported for their registration)."""

__all__ = ["REGISTRY", "Method", "MethodConfig", "StepContext", "get_method", "register"]
