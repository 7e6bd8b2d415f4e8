"""The run directory: the files one job writes about itself, the source of truth for results.

On a cluster, run directories sit on NFS or Lustre, where SQLite's file locking is not safe. So a
job never writes the results store directly: it writes its own run directory, and the store
(`unlearn.runs.store`) ingests run directories into an index that can always be rebuilt from them.

    run.json        {"format": 1, "id", "kind", "method", "config", "status", "created",
                     "started", "finished", "job_id", "model_path", "parent", "error", "final",
                     "best"}
    metrics.jsonl   {"step", "name", "value"}                    one row per logged value
    evals.jsonl     {"step", "task", "metric", "value", "stderr", "status", "error"}
    model/, adapter/  saved by the run, each with its stamp unlearn_run.json {"run", "created"}
                      and its model card README.md (unlearn.runs.cards)
    best/             --save_best: model/ (and adapter/) of the best evaluated step, best.json
                      and the stamp (unlearn.recipes.best_step)

Design choices:
- run.json is rewritten whole through a temp file + rename, so a reader sees the old or the new
  file, never a mix. Only the job that owns a run directory writes it (no locking needed).
- The JSONL files are appended, one write per call, then flushed and fsynced. A crash can leave
  a torn last line; readers skip lines that are not valid JSON (with a warning), and the next
  append first ends a torn line so it cannot swallow the next row.
- The rows themselves (run.json's RunMeta, MetricRow, EvalRow) are defined and validated in
  `unlearn.runs.rows`, re-exported here.
- A run writes only into a new or empty directory or a run directory of its own kind
  (`check_run_out`), and `reset` deletes a saved model/adapter only when its stamp proves this
  directory's run saved it: what the user put there is never deleted.
- Steps are global optimizer steps; logging the same name twice at one step means the later
  value wins in the store.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from unlearn.errors import UsageError
from unlearn.fsutil import atomic_write_json, atomic_write_text, check_output_dir
from unlearn.runs.rows import (
    EvalRow,
    MetricRow,
    RunMeta,
    RunRecord,
    eval_rows,
)

RUN_FILE, METRICS_FILE, EVALS_FILE = "run.json", "metrics.jsonl", "evals.jsonl"
CHECKPOINT_DIR, STEP_PREFIX = "checkpoint", "step-"
"""Resumable checkpoints live in OUT/checkpoint/step-NNNNNNNN (written by
unlearn.training.checkpointer)."""
SAVED_DIRS = ("model", "adapter")
"""What a run saves into its directory besides the files above (OUT/model, OUT/adapter)."""
BEST_DIR = "best"
"""OUT/best (--save_best): a folder of saved directories like OUT's, stamped like them; reset
deletes it under the same rule. Not among SAVED_DIRS: its card is not rewritten with the final
results, which are not its model's."""
OWNER_FILE = "unlearn_run.json"
"""Stamp inside each saved directory: {"run": id, "created": time} of the run that saved it. A
later run in the same directory deletes OUT/model or OUT/adapter only if its stamp names the run
of the current run.json; anything else there is the user's and is never deleted."""


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
        for name in (*SAVED_DIRS, BEST_DIR):
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
        for name in (*SAVED_DIRS, BEST_DIR):
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
    check_outside_inputs(path, inputs)
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


def check_outside_inputs(
    out: Path, inputs: dict[str, str | os.PathLike | None] | None, flag: str = "--out"
) -> None:
    """UsageError when an input ({"input model": path, ...}; hub ids are skipped) lies inside
    `out`, equals it or contains it (`flag` names the output in the message)."""
    resolved = out.resolve()
    for what, name in (inputs or {}).items():
        local = _local_path(name)
        if local is None:
            continue
        if local == resolved or resolved in local.parents or local in resolved.parents:
            raise UsageError(
                f"{flag} {out} overlaps the {what} {name}: a run would delete or bury it; "
                f"give another {flag}"
            )


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
