"""Two disjoint parts of a task's documents: one to choose on, one to report on.

    take_part(questions, "select")      # the selection part, in document order
    split_entry("mmlu@500#report")      # ("mmlu@500", "report")

A search picks its best trial by the accuracies it measured; on a small question set the lowest
of many noisy forget accuracies is biased low, so the numbers it was chosen on overstate it. A
search therefore evaluates every task in two parts, chooses on the selection part and reports
the chosen trial on the report part, which played no role in the choice.

Design choices:
- By document index, deterministic, the same everywhere: a task's documents (its first N with
  `@N`; each subtask of a benchmark group separately) are ordered by sha256("SEED:index") and
  the first SELECT_FRACTION of them (rounded, at least one document in each part) are the
  selection part, the rest the report part. Trials and baselines see the same parts; nothing
  depends on the Python version or the machine.
- A task entry names its part with a suffix, `forget#select` or `mmlu@500#report`; its key (in
  evals.jsonl, the store and tables) is the task's key with the same suffix, so both parts of a
  task are scored in one evaluation and recorded side by side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

PARTS = ("select", "report")
SELECT_FRACTION = 0.5
"""The share of a task's documents in its selection part."""
SEED = 0
"""The seed of the order that splits them."""

T = TypeVar("T")


def split_entry(entry: str) -> tuple[str, str | None]:
    """`NAME#PART` -> (NAME, PART); an entry without a known part suffix -> (entry, None)."""
    name, sep, part = entry.rpartition("#")
    if sep and part in PARTS and name:
        return name, part
    return entry, None


def with_part(entry: str, part: str) -> str:
    """The entry (or key) of `part` of a task: `forget` -> `forget#select`."""
    return f"{entry}#{part}"


def part_indices(n: int, part: str) -> list[int]:
    """The indices, in increasing order, of `part` of n documents (ValueError when n < 2: one
    document cannot be split into two non-empty parts)."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r} (one of {', '.join(PARTS)})")
    if n < 2:
        raise ValueError(f"{n} document(s) cannot be split into a selection and a report part")
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{SEED}:{i}".encode()).digest())
    k = min(n - 1, max(1, round(n * SELECT_FRACTION)))
    chosen = order[:k] if part == "select" else order[k:]
    return sorted(chosen)


def limited_part(n: int, limit: int | None, part: str) -> list[int]:
    """The indices of `part` of a task's first `limit` (None: all) of its n documents."""
    return part_indices(n if limit is None else min(n, limit), part)


def take_part(items: Sequence[T], part: str | None) -> list[T]:
    """The documents of `part` (all of them when `part` is None), in their order."""
    if part is None:
        return list(items)
    return [items[i] for i in part_indices(len(items), part)]
