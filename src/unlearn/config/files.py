"""`--config FILE` of `unlearn run` and `unlearn attack`: a run's settings read from a file,
with the command line's flags on top.

    unlearn run --config best.yaml --out /tmp/r2 --lr 1e-4
    unlearn run --config /tmp/r1 --out /tmp/r1-replay            # /tmp/r1/run.json

FILE is one of two things:
- a YAML mapping of flat field names, the names the command line uses (`method: rmu`,
  `lr: 3e-4`, `world: /tmp/w`, `out: ...`), e.g. a search's best.yaml. A key the command does
  not know is bad input (a typo must not be ignored). Relative paths resolve against the file's
  directory, by the rules of sweep specs (`unlearn.sweep.inputs`): `world`, `out`, `store` and
  `frozen_cache_dir` always (they are local), model and corpus paths only when that file exists
  (else they may be hub ids), task files and folders as in a spec's `eval:` block.
- a run directory, or a file ending in .json (its run.json): the flat config under `config`,
  written by `RunConfig.to_dict()` / `AttackConfig.to_dict()`, replays the run. Its kind must be
  the command's (unlearn for `run`, attack for `attack`); for `unlearn run` its `method` picks
  the method unless `--method` is given. Two kinds of keys are left out: `suite`, the roles of
  the resolved evaluation suite that the recipes add for reports (the suite's own fields,
  `forget_tasks` ..., are kept), and `out`, `run_id` and `store`, so that a replay never writes
  over the original run (`--out` is required, and may not be the run's own directory). Every
  other key must be a field of the command: the resolved values that `Method.describe()` adds
  (`layers`, `retain_layers`, `trained_layers`) are fields, and giving them explicitly trains
  the same model; an unknown key (a run.json of another version) is bad input, never dropped
  silently. run.json keeps paths as the run was given them (absolute when it was given them so).

How flags win: the file's values become the parser's defaults (the `default` of simple-parsing's
`add_arguments`: a dict of every field, so that a file's `max_steps: null` is kept, where
`set_defaults` would read None as "no default"). A flag given on the command line overrides
them; every other field keeps the command's own default. Values are checked and coerced like a
sweep spec's (`unlearn.config.settings.coerce_values`): a wrong type or an unknown key is one
UsageError line (exit 2) before any weights load.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn.commands.arguments import ArgumentParser
from unlearn.config.settings import coerce, coerce_values, section_defaults
from unlearn.config.yamlio import read_yaml
from unlearn.errors import UsageError
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RUN_FILE
from unlearn.sweep.inputs import EVAL_KEYS, PATH_FIELDS, eval_block, local_path

CONFIG_HELP = (
    "Settings from a file: a YAML mapping of flat field names (lr: 3e-4, ...; relative paths "
    "against its directory) or a run directory / its run.json (replays the run; --out needed). "
    "Flags given here override it."
)
INFORMATIONAL_KEYS = ("suite",)
"""Keys the recipes add to run.json's config that are not run fields: `suite`, the resolved
suite's roles (`run_unlearning`, `run_attack`). Dropped when a run.json is read."""
NOT_REPLAYED = ("out", "run_id", "store")
"""Where a run wrote: taken from a YAML file, never from a run.json (a replay is a new run)."""
LOCAL_FIELDS = ("world", "out", "store", "frozen_cache_dir", "tracking_dir")
"""Fields that are always local paths: relative ones resolve against the YAML file's folder."""


@dataclass
class ConfigFile:
    """A `--config` file, read: flat field names, not yet checked against the command's fields."""

    path: Path
    """The file read (a run directory's run.json for a run directory)."""
    values: dict[str, Any]
    run_dir: Path | None = None
    """The run directory a run.json belongs to (None for a YAML file)."""

    @property
    def method(self) -> str | None:
        """The file's `method`, if it has one."""
        value = self.values.get("method")
        return None if value is None else coerce(value, str, f"{self.path}: method")


def add_config_flag(parser: ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None, help=CONFIG_HELP)


def pre_parse(
    argv: list[str] | None, pre: ArgumentParser, kind: str
) -> tuple[argparse.Namespace, ConfigFile | None]:
    """(the flags `pre` knows, the `--config` file read or None): the file is read before the
    command's parser is built, since its values become that parser's defaults (and for `unlearn
    run` its method picks the parser's method section). `pre` has no --help; the rest of `argv`
    is left to the command's parser."""
    add_config_flag(pre)
    known, _ = pre.parse_known_args(argv)
    return known, read_config(known.config, kind) if known.config else None


def read_config(value: str, kind: str) -> ConfigFile:
    """The `--config` file `value` of a command whose runs are of `kind` (unlearn, attack)."""
    path = Path(value).expanduser()
    if path.is_dir() or path.suffix == ".json":
        return _read_run_json(path, kind)
    raw = read_yaml(path, "config file")
    if not isinstance(raw, dict):
        raise UsageError(
            f"{path}: a config file is a YAML mapping of flat field names (lr: 3e-4, ...), "
            f"got {'an empty file' if raw is None else type(raw).__name__}"
        )
    return ConfigFile(path, raw)


def _read_run_json(path: Path, kind: str) -> ConfigFile:
    file = path / RUN_FILE if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        what = f"{path} is not a run directory (no {RUN_FILE})" if path.is_dir() else None
        raise UsageError(what or f"config file {file} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read config file {file}: {e}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{file}: a run.json is a JSON object")
    try:
        meta = RunMeta.from_dict(raw)
    except UsageError as e:
        raise UsageError(f"{file}: {e}") from None
    if meta.kind != kind:
        raise UsageError(f"{file} is a run of kind {meta.kind!r}; this command replays {kind} runs")
    if not isinstance(meta.config, dict):
        raise UsageError(f"{file}: its config is not a mapping")
    dropped = (*INFORMATIONAL_KEYS, *NOT_REPLAYED)
    values = {k: v for k, v in meta.config.items() if k not in dropped}
    if meta.method is not None:  # the config has it too; the top level is the record's own
        values.setdefault("method", meta.method)
    return ConfigFile(file, values, run_dir=file.parent.absolute())


def add_sections(
    parser: ArgumentParser,
    dests: Mapping[str, type],
    base: Mapping[str, Any],
    file: ConfigFile | None,
    what: str,
) -> None:
    """Add each section class of `dests` ({dest: class}) to `parser`, its flags' defaults by
    increasing priority: the field's own, `base` (the command's defaults by flat name, e.g. a
    method's train defaults), the `file`'s values. Flags on the command line override them all.

    UsageError (one line, naming the file) for a file key no section has or a value of the
    wrong type; `what` names the config in that message ("rmu config")."""
    classes = tuple(dests.values())
    values = coerce_values(classes, base, what)
    if file is not None:
        values.update(file_values(file, classes, what))
    defaults = section_defaults(classes, values)
    for dest, cls in dests.items():
        parser.add_arguments(cls, dest=dest, default=defaults[cls])


def file_values(file: ConfigFile, classes: tuple[type, ...], what: str) -> dict[str, Any]:
    """The file's values checked and coerced to the fields of `classes`, a YAML file's relative
    paths made absolute."""
    values = coerce_values(classes, file.values, what, str(file.path))
    return values if file.run_dir is not None else _resolve_paths(values, file.path.parent)


def _resolve_paths(values: dict[str, Any], here: Path) -> dict[str, Any]:
    """Relative paths of a YAML file against its directory, the rules of sweep specs."""
    out = dict(values)
    for key, value in values.items():
        if key in LOCAL_FIELDS and isinstance(value, str) and value:
            path = Path(value).expanduser()
            out[key] = str(path if path.is_absolute() else here / path)
        elif key in PATH_FIELDS:
            out[key] = local_path(value, here)
    # Question files and task folders, as a sweep spec's `eval:` block resolves them.
    out.update(eval_block({k: out[k] for k in EVAL_KEYS if k in out}, here))
    return out


def check_replay_out(file: ConfigFile | None, out: str | None) -> None:
    """A replay writes a new run: --out may not be the directory of the run.json it replays
    (the run would be reset and trained again in place)."""
    if file is None or file.run_dir is None or not out:
        return
    if Path(out).expanduser().absolute().resolve() == file.run_dir.resolve():
        raise UsageError(
            f"--out {out} is the run directory the config is read from; a replay is a new run: "
            "give another --out"
        )
