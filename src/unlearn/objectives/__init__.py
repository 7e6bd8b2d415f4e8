"""Training objectives that are not unlearning methods: plain language modelling (the tamper
attack's fine-tuning) and distillation (UNDO's repair step). They share the methods' interface
(`phases`, `loss` over a `StepContext` returning named terms, `weights`), so the one training loop
runs them, and they are found the same way: every module beside this file is imported (pkgutil)
and registers its objective by `name`."""

from __future__ import annotations

import importlib
import pkgutil

from unlearn.objectives.registry import OBJECTIVES, get_objective, register_objective

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["OBJECTIVES", "get_objective", "register_objective"]
