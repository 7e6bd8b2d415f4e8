"""The references of a robustness suite, the filtered twin and the original target, run once per
world and comparison and cached (WORLD/robustness/INPUTS-KEY/ROLE, or a --cache folder): every
model scored on that world with that suite, held-out task, curve tasks, corpora and seed
(`SuiteInputs.key`) is compared with the same reference numbers. A cached result is reused only
when it is complete and was computed on the reference's current weights; else it is run again.

Two processes that need the same cache (two sweep points in parallel workers) take turns: the
first computes, the other waits on the cache folder's lock file and then reads its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unlearn.models.refs import ModelRef
from unlearn.robustness.per_model import SuiteInputs, cached_result, evaluate_model
from unlearn.runs.store import Store
from unlearn.tracking import TrackingArgs

REFERENCES = ("target", "filtered")
"""Reference models, in the order they run: the target first (the original accuracy)."""


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on FOLDER/.lock (created) for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ref_id(role: str, inputs: SuiteInputs, ref: ModelRef) -> str:
    """The reference's run id: one per comparison (two held-out tasks are two runs in a store)."""
    text = f"{inputs.key()}|{ref.name}|{ref.revision}"
    return f"robustness-{role}-{inputs.suite.name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def original_accuracy(row: dict[str, Any] | None) -> float | None:
    """The target's held-out accuracy before any attack (step 0 of its first done attack)."""
    for attack in (row or {}).get("attacks", []):
        curve = attack.get("curve") or []
        if curve and curve[0]["step"] == 0 and curve[0]["heldout"] is not None:
            return curve[0]["heldout"]
    return None


def reference_rows(
    inputs: SuiteInputs,
    refs: dict[str, ModelRef],
    cache: Path,
    store: str | os.PathLike | None,
    tracking: TrackingArgs | None = None,
) -> dict[str, dict[str, Any]]:
    """{role: row} of the references in `refs` (target first), each from the cache when this
    suite already ran on it there, else run now into it (reported with `tracking`); indexed in
    `store` either way."""
    rows: dict[str, dict[str, Any]] = {}
    with locked(cache):
        for role in sorted(refs, key=lambda r: REFERENCES.index(r) if r in REFERENCES else 9):
            ref, out = refs[role], cache / role
            row = cached_result(out, inputs, ref)
            if row is None:
                original = original_accuracy(rows.get("target"))
                row = evaluate_model(inputs, ref, role, role, out, _ref_id(role, inputs, ref),
                                     store=store, original=original,
                                     tracking=tracking)  # fmt: skip
            elif store is not None:
                with Store(store) as s:
                    s.ingest_tree(out)
            rows[role] = row
    return rows


def cached_reference(cache: Path, role: str, inputs: SuiteInputs, ref: ModelRef) -> dict | None:
    """The cached row of reference `role` for these inputs and weights (None: not there, partial
    or stale), read without running anything (a search's tables)."""
    return cached_result(cache / role, inputs, ref)
