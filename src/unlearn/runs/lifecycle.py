"""The one run lifecycle: open (or resume) a run directory, record the run, end it with the
status `runs.status` decides, and index it in the store.

    with run_lifecycle(fresh_meta, out, parallel=par, checkpointer=ck, store=path) as run:
        state = train(..., on_log=run.log, checkpointer=ck)
        run.save_model(par, model, tokenizer, merge=True)
        run.evaluate(step, tasks, score)
    meta = run.meta                      # the final RunMeta

Every kind of run (unlearning, attack, baseline evaluation; a sweep's points) goes through it:
- opening: a checkpoint of the same configuration in OUT is resumed (rows after its step are
  dropped), otherwise the directory starts afresh (`RunDir.reset` removes only what an earlier
  run of ours wrote); the store indexes the run as running;
- an exception inside the block is recorded with the status of its row in `status.OUTCOMES`
  (preempted, diverged, failed) and, if unexpected, raised again: a run is never left "running"
  by a crash it lived to see;
- a clean exit is "done" made worse by the evaluations recorded with `ActiveRun.evaluate`; the
  checkpoint is discarded and the run indexed again.
Ranks other than 0 of a torchrun job get a follower run directory (in memory, writes nothing);
only rank 0 touches the store, and reports to experiment trackers (`unlearn.tracking`: a copy of
each row, closed after the run's ending is recorded, whatever it is).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from unlearn.distributed import Parallel, is_main
from unlearn.errors import SaveFailed, UsageError
from unlearn.runs.cards import card_files, refresh_cards
from unlearn.runs.rows import RunMeta, utc_now
from unlearn.runs.rundir import FollowerRunDir, RunDir
from unlearn.runs.status import COLLAPSE_MARKS, error_text, outcome_of, worse
from unlearn.runs.store import Store
from unlearn.tracking import Reporter, RunInfo, TrackingArgs
from unlearn.training.checkpointer import Checkpointer


class ActiveRun:
    """The handle a recipe gets inside `run_lifecycle`: log, save, evaluate; `meta` at the end."""

    def __init__(
        self, run: RunDir, meta: RunMeta, out: Path, reporter: Reporter | None = None
    ) -> None:
        self.dir, self.meta, self.out = run, meta, out
        record = run.read()
        # A resumed run keeps the evaluations it recorded before its checkpoint, failures too.
        failed = any(e.status == "failed" for e in record.evals)
        self.eval_status = "failed" if failed else "done"
        self.reporter = reporter or Reporter()
        """Experiment trackers (`unlearn.tracking`): a copy of what the run records."""
        self.results: dict[str, Any] = {}
        """{TASK/METRIC: value} of the latest final evaluation of each task (for trackers)."""
        self.collapse_notes: list[str] = []
        """Why the final evaluation's collapsed tasks are collapsed ("task: reason"): the
        error text of a run that ends collapsed, so its table row says why."""
        # Rows a resumed run kept (up to its checkpoint's step) are already reported.
        self.first_step = 1 + max((r.step for r in (*record.metrics, *record.evals)), default=-1)

    @property
    def id(self) -> str:
        return self.meta.id

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Append logged values (the training loop's `on_log`)."""
        self.dir.append_metrics(step, values)
        self.reporter.metrics(step, values)

    def log_timing(self, step: int, values: dict[str, float]) -> None:
        """Wall-clock values of a logged step (the loop's `on_timing`: throughput): trackers
        only, since metrics.jsonl holds what a rerun reproduces."""
        self.reporter.metrics(step, values)

    def update(self, **fields: Any) -> RunMeta:
        """Change run.json fields other than the status (the lifecycle owns that)."""
        if "status" in fields:
            raise ValueError("the run lifecycle decides the status")
        self.meta = self.dir.update(**fields)
        return self.meta

    def save_model(
        self, parallel: Parallel, model, tokenizer, merge: bool, into: Path | None = None
    ) -> dict[str, str]:
        """Save the trained model into OUT, or into the folder `into` (--save_best's OUT/best),
        stamped as this run's, with its model card (the card in OUT gets the results when the
        run ends); a save the machine refuses (disk full, quota, file size limit) ends the run
        as failed with one line."""
        extra = {**self.dir.owner_files(self.meta), **card_files(self.meta, self.out)}
        where = self.out if into is None else into
        try:
            return parallel.save_model(model, tokenizer, where, merge=merge, extra_files=extra)
        except OSError as e:
            raise SaveFailed(f"saving the model failed: {e}") from e

    def evaluate(
        self,
        step: int,
        tasks: Sequence[str],
        score: Callable[[str], Any],
        metric: Callable[[str], str] | None = None,
        final: bool = True,
    ) -> str:
        """Score each task, append its rows at `step`, and fold the outcome into the status
        (unless not `final`: an intermediate evaluation, e.g. a search pruner's, is recorded but
        the status is decided by the model the run ends with).

        `score(task)` returns `(metrics, collapsed)`; any metrics will do (a perplexity task has
        ppl, nll and tokens, no acc), and `collapsed` is falsy or why the result is collapsed
        (`eval.collapse.collapse_reason`). A task whose scoring raises is a failed row with the
        error (never a number), under the metric `metric(task)` names (`Suite.metric`: ppl for a
        perplexity task; default acc), and the others still run. Returns this evaluation's
        outcome (done, collapsed or failed).
        """
        outcome = "done"
        for task in tasks:
            try:
                metrics, collapsed = score(task)
            except Exception as e:  # recorded, not raised: one bad task must not hide the others
                error = f"{type(e).__name__}: {e}"
                # The row a summary reads: a failed perplexity must not show as a failed acc.
                name = metric(task) if metric is not None else "acc"
                self.dir.append_eval(step, task, {name: None}, status="failed", error=error)
                outcome = worse(outcome, "failed")
                continue
            self.dir.append_eval(step, task, metrics)
            self.reporter.evaluation(step, task, metrics)
            if final:
                self.results.update({f"{task}/{k}": v for k, v in metrics.items()})
            if collapsed and self.meta.kind in COLLAPSE_MARKS:
                outcome = worse(outcome, "collapsed")
                if final:
                    reason = collapsed if isinstance(collapsed, str) else "collapsed"
                    self.collapse_notes.append(f"{task}: {reason}")
        if final:
            self.eval_status = worse(self.eval_status, outcome)
        return outcome

    def _tracked_config(self) -> dict[str, Any]:
        m = self.meta
        return {"kind": m.kind, "method": m.method, "parent": m.parent, **m.config}

    def run_info(self) -> RunInfo:
        """The run as a tracker sees it when it opens."""
        m = self.meta
        return RunInfo(m.id, m.kind, self.out, self._tracked_config(), m.started, self.first_step)

    def report_end(self) -> None:
        """Tell the trackers how the run ended: status, final loss terms, final results."""
        self.reporter.end(self.meta.status, self.meta.final, self.results, self._tracked_config())


def current_job_id() -> str | None:
    """The id of the SLURM (or submitit local) job this process runs in, None outside one."""
    try:
        import submitit  # heavy and optional outside sweeps

        return str(submitit.JobEnvironment().job_id)
    except (ImportError, RuntimeError, KeyError):
        return os.environ.get("SLURM_JOB_ID")


def open_run(run: RunDir, fresh: RunMeta, checkpointer: Checkpointer | None) -> RunMeta:
    """Start a run directory: resume it when it holds a checkpoint of this configuration
    (keeping its run.json and its rows up to the checkpoint's step), else start it afresh."""
    info = checkpointer.find() if checkpointer is not None else None
    job_id = current_job_id()
    if info is None:
        run.reset()
        return run.write_run(dataclasses.replace(fresh, job_id=fresh.job_id or job_id))
    step = info["step"]
    run.truncate_after(step)  # a no-op on ranks other than 0
    disk = RunDir(run.path)
    previous = disk.read_meta() if disk.exists() else fresh
    print(f"{run.path}: resuming from the checkpoint at step {step}", file=sys.stderr)
    return run.write_run(
        dataclasses.replace(
            previous,
            status="running",
            error=None,
            finished=None,
            config=fresh.config,
            job_id=job_id or previous.job_id,
        )
    )


@contextlib.contextmanager
def run_lifecycle(
    fresh: RunMeta,
    out: str | os.PathLike,
    parallel: Parallel | None = None,
    checkpointer: Checkpointer | None = None,
    store: str | os.PathLike | None = None,
    tracking: TrackingArgs | None = None,
) -> Iterator[ActiveRun]:
    """Open (or resume) the run at `out`, yield its handle, then record how it ended.

    `fresh` is the run.json of a new run (status "running"). With a checkpointer, a checkpoint of
    the same configuration in OUT is resumed, and a finished run discards it. The store, if any,
    is indexed on rank 0 when the run starts and again when it ends, whatever the ending.
    `tracking` reports the run to experiment trackers (rank 0, `unlearn.tracking`).
    """
    # The trackers close (a W&B run finishes) once the run's ending is recorded, whatever it is:
    # the reporter is closed after `_lifecycle` has left.
    reporter = Reporter()
    with (
        contextlib.closing(reporter),
        _lifecycle(fresh, out, parallel, checkpointer, store, tracking, reporter) as active,
    ):
        yield active


@contextlib.contextmanager
def _lifecycle(
    fresh: RunMeta,
    out: str | os.PathLike,
    parallel: Parallel | None,
    checkpointer: Checkpointer | None,
    store: str | os.PathLike | None,
    tracking: TrackingArgs | None,
    reporter: Reporter,
) -> Iterator[ActiveRun]:
    par = parallel or Parallel()
    out = Path(out)
    run = RunDir(out) if par.is_main else FollowerRunDir(out)
    meta = open_run(run, fresh, checkpointer)
    index = Store(store) if store and par.is_main else None
    if index is not None:
        index.upsert_run(meta, out)
    active = ActiveRun(run, meta, out, reporter)
    try:
        if tracking is not None and par.is_main and is_main():  # only rank 0 reports
            reporter.open(tracking, active.run_info())
        yield active
    except BaseException as caught:
        # A collective's timeout outside the training loop (a save, the evaluation) too.
        error: BaseException = (
            par.collective_failure(caught, "outside the training steps") or caught
        )
        outcome = outcome_of(error)
        fields: dict[str, Any] = {"status": outcome.status, "error": error_text(error)}
        if outcome.finished:
            fields["finished"] = utc_now()
        active.meta = run.update(**fields)
        active.report_end()
        if not outcome.reraise and (par.is_main or outcome.every_rank):
            print(f"{fresh.kind} {active.id}: {outcome.status}: {error}", file=sys.stderr)
        if par.is_main:  # a model saved before the failure: its card says how the run ended
            refresh_cards(out)
        _index(index, out)
        if outcome.reraise:
            raise
        return
    ending: dict[str, Any] = {"status": active.eval_status, "finished": utc_now()}
    if active.eval_status == "collapsed":
        ending["error"] = "collapsed: " + "; ".join(active.collapse_notes)
    active.meta = run.update(**ending)
    active.report_end()
    if par.is_main:  # the evaluation ran after the save: the saved card gets its results now
        refresh_cards(out)
    if checkpointer is not None:
        checkpointer.discard()
    _index(index, out)


def _index(store: Store | None, out: Path) -> None:
    if store is not None:
        store.ingest(out)
        store.close()


def mark_failed(
    path: str | os.PathLike,
    error: str,
    fresh: RunMeta | None = None,
    unfinished: Sequence[str] = ("running", "pending"),
) -> bool:
    """Record a run that ended without recording it as failed; returns whether it did.

    A run directory without run.json (its run raised before writing one) is written from
    `fresh` when given; one whose status is in `unfinished` (left running by a process that
    died, or preempted but unable to resume) is updated. Anything else already says how it
    ended and is left alone, as is an unreadable run.json (readers see it as failed).
    """
    run = RunDir(path)
    if not run.exists():
        if fresh is None:
            return False
        run.write_run(dataclasses.replace(fresh, status="failed", error=error, finished=utc_now()))
        return True
    try:
        status = run.read_meta().status
    except UsageError:
        return False
    if status not in unfinished:
        return False
    run.update(status="failed", error=error, finished=utc_now())
    return True
