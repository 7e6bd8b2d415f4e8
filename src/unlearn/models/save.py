"""Saving a trained model as ordinary HF model directories, atomically."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from unlearn.fsutil import atomic_dir
from unlearn.models.lora import is_peft


def save_model(
    model: torch.nn.Module,
    tokenizer,
    out_dir,
    merge: bool = True,
    extra_files: dict[str, str] | None = None,
) -> dict[str, str]:
    """Save atomically: a PEFT model as OUT/adapter (+ merged OUT/model), a plain one as OUT/model.

    Merging works on a copy so the training model keeps its adapters. `extra_files` ({name:
    text}) are written into each saved directory before it appears (a run's ownership stamp,
    `rundir.OWNER_FILE`). Returns the paths written.
    """

    def extras(tmp) -> None:
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    out_dir = Path(out_dir)
    written = {}
    if is_peft(model):
        with atomic_dir(out_dir / "adapter") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            extras(tmp)
        written["adapter"] = str(out_dir / "adapter")
        if not merge:
            return written
        model = copy.deepcopy(model).merge_and_unload()
    with atomic_dir(out_dir / "model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        extras(tmp)
    written["model"] = str(out_dir / "model")
    return written
