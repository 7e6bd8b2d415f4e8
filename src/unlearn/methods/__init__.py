"""Unlearning methods, one file each, found by name in a registry (the trainer never branches on
a name). Importing this package imports every module beside this file (pkgutil), and each
registers its method: a new method is a new file here, with no other edit."""

from __future__ import annotations

import importlib
import pkgutil

from unlearn.methods.base import Method, MethodConfig, StepContext
from unlearn.methods.registry import REGISTRY, get_method, register

_SUPPORT = ("base", "registry")
"""Modules of this package that hold shared parts, not a method."""

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "Method", "MethodConfig", "StepContext", "get_method", "register"]
