"""A training checkpoint's files: plain `torch.save` archives whose size and sha256 are recorded
in state.json while they are written (no second read of a file that can be tens of gigabytes),
and verified before any weights load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from unlearn.errors import UsageError

FORMAT = 1

TENSOR_FILES = ("model.pt", "optimizer.pt", "rng.pt")
"""A checkpoint's tensor files; state.json records each one's size and sha256."""


def read_info(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's state.json: format, step, world_size, config, train_state."""
    try:
        info = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read checkpoint {checkpoint}: {e}") from None
    if info.get("format") != FORMAT:
        raise UsageError(f"checkpoint {checkpoint}: unsupported format {info.get('format')!r}")
    return info


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only file wrapper that counts and hashes what torch.save writes through it, so a
    checkpoint's checksum costs no second read of a file that can be tens of gigabytes."""

    def __init__(self, f: Any) -> None:
        self.f, self.size, self.hash = f, 0, hashlib.sha256()

    def write(self, data: Any) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_tensors(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save `obj` to `path`, fsynced; returns the file's size and sha256 for state.json."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": writer.size, "sha256": writer.hash.hexdigest()}


def _file_problem(checkpoint: Path, name: str, expected: dict[str, Any] | None) -> str | None:
    """What is wrong with one file of a checkpoint (None: nothing found). Without a record
    (a checkpoint written before sizes and checksums were kept) only its presence is checked."""
    path = checkpoint / name
    if not path.is_file():
        return f"{name} is missing"
    if expected is None:
        return None
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{name} has {size:,} bytes, {expected['bytes']:,} were written"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    if digest.hexdigest() != expected["sha256"]:
        return f"{name} does not match the checksum written with it"
    return None


def damage(checkpoint: Path, info: dict[str, Any] | None = None) -> str | None:
    """Why a checkpoint cannot be loaded (an unreadable state.json, a file missing, cut short
    or altered since it was written), or None when it is intact. Reads every file once."""
    if info is None:
        try:
            info = read_info(checkpoint)
        except UsageError as e:
            return str(e)
    files = info.get("files") or {}
    for name in TENSOR_FILES:
        problem = _file_problem(checkpoint, name, files.get(name))
        if problem is not None:
            return problem
    return None
