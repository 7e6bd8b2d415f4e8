"""The objective registry: an objective class registers itself by its `name`; the recipes find
it by name."""

from __future__ import annotations

from typing import Any

OBJECTIVES: dict[str, type[Any]] = {}


def register_objective(cls: type[Any]) -> type[Any]:
    if not isinstance(getattr(cls, "name", None), str) or not getattr(cls, "summary", None):
        # A programming error: the name is how recipes find it, the summary how docs list it.
        raise TypeError(f"objective {cls.__name__} must declare `name` and `summary`")
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(name: str) -> type[Any]:
    """The registered objective class called `name` (a KeyError names the known ones)."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r} (known: {', '.join(sorted(OBJECTIVES))})")
    return OBJECTIVES[name]
