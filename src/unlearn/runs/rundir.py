"""The run directory: the files one job writes about itself, the source of truth for results.

On a cluster, run directories sit on NFS or Lustre, where SQLite's file locking is not safe. So a
job never writes the results store directly: it writes its own run directory, and the store
(`unlearn.runs.store`) ingests run directories into an index that can always be rebuilt from them.

    run.json        {"format": 1, "id", "kind", "method", "config", "status", "created",
                     "started", "finished", "job_id", "model_path", "parent", "error", "final"}
    metrics.jsonl   {"step", "name", "value"}                    one row per logged value
    evals.jsonl     {"step", "task", "metric", "value", "stderr", "status", "error"}
    model/, adapter/  saved by the run, each with its stamp unlearn_run.json {"run", "created"}

Design choices:
- run.json is rewritten whole through a temp file + rename, so a reader sees the old or the new
  file, never a mix. Only the job that owns a run directory writes it (no locking needed).
- The JSONL files are appended, one write per call, then flushed and fsynced. A crash can leave
  a torn last line; readers skip lines that are not valid JSON (with a warning), and the next
  append first ends a torn line so it cannot swallow the next row.
- A failed evaluation is a row with status "failed", value null and the error text: never a
  number (a missing eval recorded as chance accuracy reads as perfect unlearning).
- Strict JSON has no NaN or infinity. A non-finite loss value (a diverging run) is written as
  null; a non-finite evaluation value turns that row into a failed eval.
- A run writes only into a new or empty directory or a run directory of its own kind
  (`check_run_out`), and `reset` deletes a saved model/adapter only when its stamp proves this
  directory's run saved it: what the user put there is never deleted.
- Steps are global optimizer steps; logging the same name twice at one step means the later
  value wins in the store.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from unlearn.errors import UsageError
from unlearn.fsutil import atomic_write_json, atomic_write_text, check_output_dir

FORMAT = 1
KINDS = ("baseline", "unlearn", "attack")
STATUSES = ("pending", "running", "done", "failed", "diverged", "collapsed", "preempted")
"""preempted: stopped by a signal after writing OUT/checkpoint; rerunning the command resumes."""
EVAL_STATUSES = ("done", "failed")
RUN_FILE, METRICS_FILE, EVALS_FILE = "run.json", "metrics.jsonl", "evals.jsonl"
CHECKPOINT_DIR, STEP_PREFIX = "checkpoint", "step-"
"""Resumable checkpoints live in OUT/checkpoint/step-NNNNNNNN (written by unlearn.resume)."""
SAVED_DIRS = ("model", "adapter")
"""What a run saves into its directory besides the files above (OUT/model, OUT/adapter)."""
OWNER_FILE = "unlearn_run.json"
"""Stamp inside each saved directory: {"run": id, "created": time} of the run that saved it. A
later run in the same directory deletes OUT/model or OUT/adapter only if its stamp names the run
of the current run.json; anything else there is the user's and is never deleted."""
STDERR_SUFFIX = "_stderr"
"""`append_eval({"acc": 0.4, "acc_stderr": 0.01})` stores one row `acc` with its stderr
(lm-evaluation-harness names standard errors this way)."""


def utc_now() -> str:
    """The current time as an ISO-8601 UTC timestamp (seconds), the format of run.json times."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _finite_or_none(value: Any, what: str) -> float | None:
    """A float for a finite number, None for NaN/inf/None; UsageError for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{what} must be a number, got {value!r}")
    return float(value) if math.isfinite(value) else None


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UsageError(f"step must be an integer >= 0, got {step!r}")
    return step


@dataclass
class RunMeta:
    """The content of run.json."""

    id: str
    kind: str
    """baseline (a reference model evaluated as is), unlearn or attack."""
    method: str | None = None
    """The unlearning method's registry name; required for kind "unlearn"."""
    config: dict[str, Any] = field(default_factory=dict)
    """The run's full configuration. Baselines carry {"name": display name, "role": "target" |
    "ignorant" | "filtered"}; the report labels them by name and finds the original by role."""
    status: str = "pending"
    created: str | None = field(default_factory=utc_now)
    started: str | None = None
    finished: str | None = None
    job_id: str | None = None
    model_path: str | None = None
    parent: str | None = None
    """For an attack: the run id (or model path) of the model it started from."""
    error: str | None = None
    final: dict[str, float | None] = field(default_factory=dict)
    """Final value of each named loss term (None when non-finite)."""
    format: int = FORMAT

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or "/" in self.id:
            raise UsageError(f"run id must be a non-empty string without '/', got {self.id!r}")
        if self.kind not in KINDS:
            raise UsageError(f"run kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.status not in STATUSES:
            raise UsageError(
                f"run status must be one of {', '.join(STATUSES)}, got {self.status!r}"
            )
        if self.kind == "unlearn" and not self.method:
            raise UsageError(f"unlearn run {self.id!r} needs a method name")
        if not isinstance(self.config, dict):
            raise UsageError(f"run {self.id!r}: config must be a dict")
        if not isinstance(self.final, dict):
            raise UsageError(f"run {self.id!r}: final must be a dict of loss term values")
        self.final = {
            str(k): _finite_or_none(v, f"final loss {k!r}") for k, v in self.final.items()
        }
        if self.format != FORMAT:
            raise UsageError(f"run {self.id!r}: unsupported run.json format {self.format!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMeta:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UsageError(f"unknown run.json field(s) {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:  # a required field is missing
            raise UsageError(f"bad run.json content: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": d.pop("format"), **d}


@dataclass(frozen=True)
class MetricRow:
    """One logged value (a loss term, a coefficient, a learning rate) at one optimizer step."""

    step: int
    name: str
    value: float | None
    """None when the value was not finite."""

    def __post_init__(self) -> None:
        _check_step(self.step)
        if not isinstance(self.name, str) or not self.name:
            raise UsageError(f"metric name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "value", _finite_or_none(self.value, f"metric {self.name!r}"))


@dataclass(frozen=True)
class EvalRow:
    """One metric of one evaluation task at one step; failed rows carry no value."""

    step: int
    task: str
    metric: str
    value: float | None
    stderr: float | None = None
    status: str = "done"
    error: str | None = None

    def __post_init__(self) -> None:
        _check_step(self.step)
        for name in ("task", "metric"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise UsageError(f"eval {name} must be a non-empty string, got {v!r}")
        if self.status not in EVAL_STATUSES:
            raise UsageError(f"eval status must be done or failed, got {self.status!r}")
        for name in ("value", "stderr"):
            # A hand-edited or foreign evals.jsonl can hold any JSON: a string stored as a done
            # result stays text in SQLite and crashes the report later. Refused at ingest.
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UsageError(
                    f"eval {self.task}/{self.metric}: {name} must be a finite number, got {v!r}"
                )
            object.__setattr__(self, name, float(v))
        if self.status == "done" and (self.value is None or self.error is not None):
            raise UsageError(f"a done eval ({self.task}/{self.metric}) needs a value and no error")
        if self.status == "failed" and (self.value is not None or not self.error):
            raise UsageError(f"a failed eval ({self.task}/{self.metric}) needs an error, no value")


def eval_rows(
    step: int,
    task: str,
    metrics: dict[str, Any] | None,
    status: str = "done",
    error: str | None = None,
) -> list[EvalRow]:
    """Turn one task's evaluation result into rows (shared by RunDir and Store).

    `metrics` maps metric names to numbers; `NAME_stderr` keys become the stderr of NAME. A failed
    eval (status "failed") keeps only the metric names, with null values; with metrics=None it is
    recorded under "acc", the metric the report reads. A non-finite value of a done eval makes
    that row failed: it must never be read as a number.
    """
    if status not in EVAL_STATUSES:
        raise UsageError(f"eval status must be done or failed, got {status!r}")
    if status == "done" and error is not None:
        raise UsageError("a done eval cannot carry an error; use status='failed'")
    metrics = dict(metrics or {})
    stderrs = {
        k[: -len(STDERR_SUFFIX)]: metrics.pop(k) for k in list(metrics) if k.endswith(STDERR_SUFFIX)
    }
    orphans = set(stderrs) - set(metrics)
    if orphans:
        raise UsageError(f"eval {task!r}: stderr given without its metric: {sorted(orphans)}")
    if status == "failed":
        names = list(metrics) or ["acc"]
        message = error or "evaluation failed (no error text)"
        return [EvalRow(step, task, m, None, None, "failed", message) for m in names]
    if not metrics:
        raise UsageError(f"eval {task!r}: a done eval needs at least one metric")
    rows = []
    for name, raw in metrics.items():
        value = _finite_or_none(raw, f"eval {task}/{name}")
        if value is None:
            rows.append(
                EvalRow(step, task, name, None, None, "failed", f"non-finite {name}: {raw}")
            )
        else:
            stderr = _finite_or_none(stderrs.get(name), f"eval {task}/{name} stderr")
            rows.append(EvalRow(step, task, name, value, stderr))
    return rows


@dataclass
class RunRecord:
    """Everything a run directory holds."""

    path: Path
    meta: RunMeta
    metrics: list[MetricRow]
    evals: list[EvalRow]


def _append_lines(path: Path, rows: list[dict]) -> None:
    """Append JSON lines in one write, then flush and fsync (the row is on disk on return)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a+b") as f:
        # A crash mid-append leaves a line without its newline: end it, so the torn fragment
        # stays on a line of its own (skipped on read) instead of corrupting this row too.
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = "\n" + data
        f.write(data.encode())
        f.flush()
        os.fsync(f.fileno())


def _read_lines(path: Path, row_type: type) -> list:
    """Rows of a JSONL file; undecodable (torn) lines are skipped with a warning."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{lineno}: skipped a torn line", stacklevel=3)
                continue
            if not isinstance(d, dict):
                raise UsageError(f"{path}:{lineno}: expected a JSON object")
            try:
                rows.append(row_type(**d))
            except (TypeError, UsageError) as e:
                raise UsageError(f"{path}:{lineno}: {e}") from None
    return rows


class RunDir:
    """Reads and writes one run directory. Only the job that owns the run should write it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def evals_file(self) -> Path:
        return self.path / EVALS_FILE

    def exists(self) -> bool:
        return self.run_file.is_file()

    @staticmethod
    def owner_files(meta: RunMeta) -> dict[str, str]:
        """The stamp to save inside OUT/model and OUT/adapter: {file name: text}."""
        return {OWNER_FILE: json.dumps({"run": meta.id, "created": meta.created}) + "\n"}

    def owns(self, saved: Path) -> bool:
        """Whether the run of this directory's run.json saved `saved` (its stamp says so)."""
        try:
            meta = self.read_meta()
            stamp = json.loads((saved / OWNER_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, UsageError):
            return False
        return stamp == {"run": meta.id, "created": meta.created}

    def check_reset(self) -> None:
        """UsageError unless `reset` would delete only what an earlier run here wrote."""
        for name in SAVED_DIRS:
            saved = self.path / name
            if (saved.exists() or saved.is_symlink()) and not self.owns(saved):
                raise UsageError(
                    f"{saved} was not written by the run in {self.path}; "
                    "move it away or give another --out"
                )

    def reset(self) -> None:
        """Start the directory afresh: drop the files and saved models of an earlier run, so a
        new run's curve never mixes with old rows and a stale model is never taken for its.

        A model or adapter directory the earlier run cannot be proven to have saved (no stamp
        of it, `OWNER_FILE`) is a UsageError, checked before anything is deleted.
        """
        import shutil

        self.check_reset()
        for name in SAVED_DIRS:
            if (self.path / name).exists():
                shutil.rmtree(self.path / name)
        for f in (self.run_file, self.metrics_file, self.evals_file):
            f.unlink(missing_ok=True)

    def write_run(self, meta: RunMeta | dict[str, Any]) -> RunMeta:
        """Validate and write run.json atomically (creating the directory); returns the meta."""
        if isinstance(meta, dict):
            meta = RunMeta.from_dict(meta)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_file, meta.to_dict())
        return meta

    def read_meta(self) -> RunMeta:
        if not self.exists():
            raise UsageError(f"{self.path} is not a run directory (no {RUN_FILE})")
        try:
            d = json.loads(self.run_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read {self.run_file}: {e}") from None
        if not isinstance(d, dict):
            raise UsageError(f"{self.run_file}: expected a JSON object")
        try:
            return RunMeta.from_dict(d)
        except UsageError as e:
            raise UsageError(f"{self.run_file}: {e}") from None

    def update(self, **fields_: Any) -> RunMeta:
        """Change some run.json fields (e.g. status="done", finished=utc_now()) atomically."""
        d = self.read_meta().to_dict()
        unknown = set(fields_) - set(d)
        if unknown:
            raise UsageError(f"unknown run.json field(s) {sorted(unknown)}")
        d.update(fields_)
        return self.write_run(d)

    def append_metrics(self, step: int, values: dict[str, Any]) -> None:
        """Append one row per named value logged at `step`."""
        rows = [MetricRow(step, name, value) for name, value in values.items()]
        if rows:
            _append_lines(self.metrics_file, [asdict(r) for r in rows])

    def append_eval(
        self,
        step: int,
        task: str,
        metrics: dict[str, Any] | None,
        status: str = "done",
        error: str | None = None,
    ) -> list[EvalRow]:
        """Append one task's evaluation at `step` (see `eval_rows`); returns the rows written."""
        rows = eval_rows(step, task, metrics, status, error)
        _append_lines(self.evals_file, [asdict(r) for r in rows])
        return rows

    def truncate_after(self, step: int) -> None:
        """Drop the metric and eval rows logged after `step` (torn lines go too): a run resumed
        from a checkpoint at `step` then holds exactly what an uninterrupted run would."""
        for path in (self.metrics_file, self.evals_file):
            if not path.exists():
                continue
            kept = []
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                step_of_row = row.get("step") if isinstance(row, dict) else None
                if isinstance(step_of_row, int) and step_of_row <= step:
                    kept.append(line + "\n")
            atomic_write_text(path, "".join(kept))

    def read(self) -> RunRecord:
        return RunRecord(
            path=self.path,
            meta=self.read_meta(),
            metrics=_read_lines(self.metrics_file, MetricRow),
            evals=_read_lines(self.evals_file, EvalRow),
        )


def _local_path(name: str | os.PathLike | None) -> Path | None:
    """The resolved path of an input that exists on this machine (None for hub ids)."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return path.resolve() if path.exists() else None


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """A run directory's checkpoint directories, newest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    steps = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit()
    ]
    return sorted(steps, key=lambda p: int(p.name[len(STEP_PREFIX) :]), reverse=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run directory, or None."""
    found = checkpoints(run_dir)
    return found[0] if found else None


def _is_run_dir(path: Path) -> bool:
    """A directory a run wrote: its run.json, or a resumable checkpoint (OUT/checkpoint/step-N)."""
    return (path / RUN_FILE).is_file() or latest_checkpoint(path) is not None


def check_run_out(
    out: str | os.PathLike, kind: str, inputs: dict[str, str | os.PathLike | None] | None = None
) -> Path:
    """The absolute run directory `out`, after checking that a run of `kind` may write it.

    Checked before anything loads or is written (every failure is one UsageError line):
    - no input (`inputs`: {"input model": path, ...}; hub ids are skipped) lies inside `out`,
      equals it or contains it: `reset` deletes OUT/model, and a run dir inside a model dir is
      lost when that model is saved again;
    - `out` is new, an empty directory or a run directory (run.json) of the same kind, whose
      saved model/adapter directories carry this run's stamp; a file, a foreign directory or a
      run of another kind (an attack over an unlearning run) is never replaced or mixed into.
    """
    path = Path(out).expanduser().absolute()
    resolved = path.resolve()
    for what, name in (inputs or {}).items():
        local = _local_path(name)
        if local is None:
            continue
        if local == resolved or resolved in local.parents or local in resolved.parents:
            raise UsageError(
                f"--out {path} overlaps the {what} {name}: a run would delete or bury it; "
                "give another --out"
            )
    path = check_output_dir(path, "a run directory", _is_run_dir)
    run = RunDir(path)
    if run.exists():
        previous = run.read_meta()
        if previous.kind != kind:
            raise UsageError(
                f"--out {path} holds a run of kind {previous.kind!r}, this one is {kind!r}; "
                "give another --out"
            )
        run.check_reset()
    return path


class FollowerRunDir(RunDir):
    """The run directory of a torchrun rank other than 0: run.json lives in memory and nothing
    is written (rank 0 owns the files; two writers would tear them)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.meta: RunMeta | None = None

    def reset(self) -> None:
        return None

    def write_run(self, meta: RunMeta | dict[str, Any]) -> RunMeta:
        self.meta = RunMeta.from_dict(meta) if isinstance(meta, dict) else meta
        return self.meta

    def read_meta(self) -> RunMeta:
        if self.meta is None:
            raise UsageError("run.json has not been written yet")
        return self.meta

    def append_metrics(self, step: int, values: dict[str, Any]) -> None:
        return None

    def append_eval(
        self,
        step: int,
        task: str,
        metrics: dict[str, Any] | None,
        status: str = "done",
        error: str | None = None,
    ) -> list[EvalRow]:
        return eval_rows(step, task, metrics, status, error)

    def truncate_after(self, step: int) -> None:
        return None

    def read(self) -> RunRecord:
        # Rank 0 may be rewriting the files right now; followers never need their rows.
        return RunRecord(path=self.path, meta=self.read_meta(), metrics=[], evals=[])
