"""The YAML loader of every file a user writes for us (sweep specs, search specs, robustness
suites): safe, exponent floats as floats, duplicate keys an error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from unlearn.errors import UsageError


class SpecLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string (it wants `1.0e-3`); learning rates are written that
    way, so exponent floats resolve to float here. Duplicate keys are an error, not last-wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [
            k.value
            for k, _ in node.value
            if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge"
        ]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key(s) {', '.join(duplicates)}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_yaml(path: Path, what: str) -> Any:
    """The YAML file `path` (a `what`: "sweep spec", "suite file") parsed with `SpecLoader`;
    a missing, unreadable or invalid file is one UsageError line (with the line and column)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {what} {path}: {e}") from None
    try:
        return yaml.load(text, Loader=SpecLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{path}: invalid YAML{where}: {problem}") from None
