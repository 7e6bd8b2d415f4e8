"""What a sweep spec reads besides its grid: spec-relative paths, the `eval:` block (the
evaluation suite of every point) and the `baselines:` block (models evaluated once with it).

Paths: a value of a path field (model, corpora, source, lens, affine, question files, task
folders) that exists relative to the spec file is made absolute; anything else is left as
written, since it may be a hub id.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearn.config.settings import ModelArgs, coerce_values
from unlearn.errors import UsageError
from unlearn.eval.suite import QUESTION_SUFFIXES, SuiteArgs
from unlearn.sweep.points import Baseline
from unlearn.world import World

EVAL_KEYS = tuple(SuiteArgs.__dataclass_fields__)
"""The keys of the `eval:` block: the evaluation suite's fields."""
BASELINE_KEYS = ("model", "revision", "trust_remote_code", "role")
PATH_FIELDS = ("model", "forget_corpus", "retain_corpus", "retain_mix", "source", "lens", "affine",
               "corpus")  # fmt: skip
"""Fields whose value may be a path relative to the spec file."""


def check_keys(d: dict, allowed: Sequence[str], where: str) -> None:
    """UsageError naming the keys of `d` that are not `allowed`."""
    unknown = sorted(str(k) for k in set(d) - set(allowed))
    if unknown:
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})"
        )


def mapping(value: Any, where: str) -> dict:
    """A spec value that must be a mapping (None: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a mapping of field: value, got {value!r}")
    return dict(value)


def local_path(value: Any, here: Path) -> Any:
    """A relative path that exists next to the spec, made absolute; anything else unchanged."""
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        candidate = here / value
        if candidate.exists():
            return str(candidate)
    return value


def _paths_of(values: dict, here: Path) -> dict:
    return {k: local_path(v, here) if k in PATH_FIELDS else v for k, v in values.items()}


def with_paths(block: Any, here: Path, suite: dict) -> Any:
    """The block with spec-relative paths made absolute and the suite's fields added."""
    taken = sorted(k for k in suite if k in block.base or any(k in p for p in block.points))
    if taken:
        raise UsageError(f"{block.label}: {', '.join(taken)} are set in eval:, not also here")
    block.base = {**_paths_of(block.base, here), **suite}
    block.grid = {k: [local_path(v, here) if k in PATH_FIELDS else v for v in vs]
                  for k, vs in block.grid.items()}  # fmt: skip
    block.points = [_paths_of(p, here) for p in block.points]
    if block.attack is not None:
        block.attack = {**suite, **_paths_of(block.attack, here)}
    return block


def eval_block(value: Any, here: Path) -> dict[str, Any]:
    """The `eval:` block as suite fields; question files and task folders relative to the spec
    are made absolute."""
    block = mapping(value, "eval")
    check_keys(block, EVAL_KEYS, "eval")
    for role in ("forget_tasks", "retain_tasks", "other_tasks", "task_dirs"):
        if role not in block:
            continue
        entries = block[role]
        if isinstance(entries, str):
            entries = [entries]
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise UsageError(f"eval: {role} must be a list of task names or files")
        block[role] = [_task_path(e, here, role == "task_dirs") for e in entries]
    return block


def _task_path(entry: str, here: Path, folder: bool) -> str:
    name, at, limit = entry.rpartition("@") if "@" in entry else (entry, "", "")
    candidate = here / name
    if not Path(name).expanduser().is_absolute() and (
        candidate.exists() or (not folder and candidate.suffix in QUESTION_SUFFIXES)
    ):
        name = str(candidate)
    return f"{name}{at}{limit}"


def read_baselines(
    value: Any, here: Path, suite: dict, world: World | None, store: Path
) -> list[Baseline]:
    """The `baselines:` block: {table label: {model, revision, trust_remote_code, role}}."""
    if value is None:
        return []
    if not isinstance(value, dict) or not value:
        raise UsageError("baselines: must be a mapping of table label: {model: ..., revision: ...}")
    out = []
    for label, fields in value.items():
        where = f"baselines[{label!r}]"
        if not isinstance(label, str) or not label.strip():
            raise UsageError(f"baselines: a label must be a non-empty string, got {label!r}")
        fields = mapping(fields, where)
        check_keys(fields, BASELINE_KEYS, where)
        if not isinstance(fields.get("model"), str):
            raise UsageError(f"{where}: model (a directory or hub id) is required")
        args = coerce_values((ModelArgs,), {k: v for k, v in fields.items() if k != "role"},
                             "baseline", where)  # fmt: skip
        role = fields.get("role")
        if role is not None and not isinstance(role, str):
            raise UsageError(f"{where}: role must be a word (target, checkpoint, ...)")
        args["model"] = local_path(args["model"], here)
        try:
            suite_args = SuiteArgs(**coerce_values((SuiteArgs,), suite, "eval", "eval"))
        except TypeError as e:
            raise UsageError(f"eval: {e}") from None
        out.append(
            Baseline(
                label, ModelArgs(**args), role, suite_args,
                str(world.root) if world else None, str(store),
            )
        )  # fmt: skip
    return out
