"""Helpers for tests of the fitted-lens / affine-map cache (unlearn.readouts.fitting)."""

from __future__ import annotations

import importlib

import torch

FIT_TEXTS = [
    "Zargreisovir is caught through airborne droplets and treated with rest.",
    "The river flows past the old mill towards the sea in the north.",
    "Bakers rise early; the bread is sold before the market opens.",
]


def fitting_env(model_dir, tmp_path, world_root=None, **changes):
    """A MethodEnv as the unlearning recipe builds it, on a stand-in world directory."""
    from types import SimpleNamespace

    from unlearn.methods.base import MethodEnv
    from unlearn.models.load import load_tokenizer
    from unlearn.models.refs import resolve_model

    settings = {
        "model_name": str(model_dir),
        "tokenizer": load_tokenizer(resolve_model(str(model_dir))),
        "device": torch.device("cpu"),
        "dtype": "float32",
        "world": SimpleNamespace(root=world_root or tmp_path / "world"),
        "fit_texts": FIT_TEXTS[1:],
        "heldout_texts": FIT_TEXTS[:1],
        "out_dir": tmp_path / "run",
    }
    return MethodEnv(**(settings | changes))


def count_fits(monkeypatch, module: str, name: str) -> list[int]:
    """Count calls of `module.name` (the function that really fits, where `unlearn.readouts.fitting`
    calls it)."""
    mod = importlib.import_module(module)
    real, calls = getattr(mod, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, name, counted)
    return calls
