"""A search's `space:` block: run fields -> Optuna distributions, checked before anything runs.

    space:
      lr: {log: [1.0e-4, 3.0e-3]}        # log-uniform float (or int, on an int field)
      retain_coef: {float: [1, 50]}      # uniform float
      max_steps: {int: [64, 256]}        # uniform integer, both ends included
      optimizer: {choice: [adamw, muon]} # one of the values

Design choices:
- A parameter is a run field (the flat names of `unlearn run` and sweep specs); each range end
  and each choice is checked by the config builder's own rules (`coerce_values`), so a range
  that cannot be a value of its field fails here, in one line, not in trial 17.
- Sampled floats are rounded to 3 significant digits before they become a run's config: run
  ids and tables stay readable (lr 0.000312, not 0.00031234567) and two trials that differ only
  past the third digit are one configuration. The trial's Optuna params keep what was sampled.
- With several methods the method is itself a parameter (`method`, a choice) and each method's
  fields are named `<method>.<field>` in the study: a field's range is per method (RMU's lr and
  the lens method's are different parameters), and Optuna never sees one name with two ranges.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from unlearn.config.settings import coerce_values, flat_fields
from unlearn.errors import UsageError

KINDS = ("float", "log", "int", "choice")
SIGNIFICANT = 3
"""Significant digits a sampled float keeps in the run's config."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched field: a range (float, log, int) or a list of values (choice)."""

    field: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()
    integer: bool = False
    """The field is an integer (a log range on it samples integers)."""

    def range_text(self) -> str:
        """`float [1, 20]`, `log [0.0001, 0.01]`, `one of adamw, muon`."""
        if self.kind == "choice":
            return f"one of {', '.join(map(str, self.choices))}"
        return f"{self.kind} [{self.low:g}, {self.high:g}]"

    def suggest(self, trial: Any, name: str) -> Any:
        """Sample this parameter from an Optuna trial under the study name `name`."""
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        log = self.kind == "log"
        if self.kind == "int" or self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=log)
        return rounded(trial.suggest_float(name, float(self.low), float(self.high), log=log))


def rounded(value: float) -> float:
    """`value` to SIGNIFICANT significant digits (0 stays 0)."""
    if value == 0 or not math.isfinite(value):
        return value
    digits = SIGNIFICANT - 1 - math.floor(math.log10(abs(value)))
    return float(round(value, digits))


def parse_space(
    block: Any, sections: Sequence[type], managed: Sequence[str], where: str
) -> list[Param]:
    """The `space:` mapping as Params for a run config of `sections` (UsageError on anything
    wrong: an unknown field, an empty or inverted range, a log range touching 0, a value its
    field cannot take); `managed` are fields the search sets itself."""
    if not isinstance(block, Mapping) or not block:
        raise UsageError(f"{where}: space must be a non-empty mapping of field: {{kind: range}}")
    owners = flat_fields(tuple(sections))
    params = []
    for name, spec in block.items():
        at = f"{where}: space.{name}"
        if name in managed or name == "method":
            raise UsageError(f"{at}: set by the search itself, it cannot be searched")
        if name not in owners:
            raise UsageError(f"{at}: unknown field (not a field of this method's run config)")
        params.append(_param(name, spec, owners[name][1], sections, at))
    return params


def _param(name: str, spec: Any, hint: Any, sections: Sequence[type], at: str) -> Param:
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise UsageError(f"{at}: give one of {{float|log|int: [lo, hi]}} or {{choice: [...]}}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise UsageError(f"{at}: {kind} needs a non-empty list")
    if kind == "choice":
        typed = [_typed(name, v, sections, at) for v in values]
        if len({repr(v) for v in typed}) != len(typed):
            raise UsageError(f"{at}: choice lists a value twice")
        return Param(name, kind, choices=tuple(typed))
    if len(values) != 2:
        raise UsageError(f"{at}: {kind} needs [low, high], got {values!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UsageError(f"{at}: {kind} bounds must be numbers, got {values!r}")
    low, high = values
    if not low < high:
        raise UsageError(f"{at}: empty or inverted range [{low}, {high}] (low must be < high)")
    if kind == "log" and low <= 0:
        raise UsageError(f"{at}: a log range needs bounds > 0, got [{low}, {high}]")
    integer = _concrete(hint) is int
    if kind == "int" and not integer:
        raise UsageError(f"{at}: an int range needs an integer field ({name} is not)")
    if integer and not all(isinstance(v, int) for v in values):
        raise UsageError(f"{at}: {name} is an integer field: give integer bounds")
    if kind == "float" and integer:
        raise UsageError(f"{at}: {name} is an integer field: use int (or log) instead of float")
    # Both ends must be values the field accepts (types and the config's own checks).
    for v in values:
        _typed(name, v, sections, at)
    return Param(name, kind, low, high, integer=integer)


def _concrete(hint: Any) -> Any:
    """`int | None` -> int: the type a value of the field has when it is set."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return options[0] if len(options) == 1 else hint
    return hint


def _typed(name: str, value: Any, sections: Sequence[type], at: str) -> Any:
    return coerce_values(sections, {name: value}, "run config", at)[name]


def study_name(method: str, field: str, several: bool) -> str:
    """The parameter's name in the study: `<method>.<field>` when the study has several methods
    (each method's ranges are its own), else the field's name."""
    return f"{method}.{field}" if several else field
