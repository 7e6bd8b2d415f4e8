"""Running a search: the reference, the workers (in this process, N local processes, or N
submitit jobs) sharing one study, then the outputs.

    result = run_search(load_search("rmu.yaml"), workers=2)

Design choices:
- The driver holds the search lock (one live search per OUT), evaluates the baselines (the
  target first: the reference of the retain constraint, stored in the study once), recovers
  trials a killed search left running, then starts the workers. Each worker loops: ask a trial
  within the budget, run it, tell it; so a rerun continues the study where it stopped.
- Workers are processes that share only the study's journal and the store, never memory: the
  same loop runs in this process (--workers 1), in spawned local processes (the cores split, as
  sweep workers do) or as SLURM jobs (submitit; N jobs on any nodes sharing the filesystem).
- A stop signal (SIGTERM, SIGUSR1/2) ends each worker after its trial in flight, which
  checkpoints if it was training: the trial is queued again for the rerun.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from unlearn.errors import UsageError
from unlearn.runs.store import Store
from unlearn.search.outputs import SearchResult, collect, write_outputs
from unlearn.search.spec import Search
from unlearn.search.study import REFERENCE, ask, check_spec, open_study, recover
from unlearn.search.trial import run_trial
from unlearn.sweep.execute import run_point, sweep_lock
from unlearn.sweep.slurm import CLUSTERS
from unlearn.sweep.spec import check_out
from unlearn.sweep.workers import WorkerPool
from unlearn.training.preemption import deferring_signals, stop_requested

JOBS_DIR = "jobs"


class SearchStopped(Exception):
    """A stop signal ended the search after the trials in flight (rerun to continue)."""


class ReferenceFailed(RuntimeError):
    """The target's evaluation has no result: no constraint can be computed (exit 1)."""


def work(search: Search, worker: int = 0, log: Callable[[str], None] = print) -> int | None:
    """One worker: run trials until the budget is spent or a stop signal arrives (in a SLURM
    job: preemption or the time limit's notice); returns the signal's number, None when the
    budget ended it."""
    study = open_study(search, worker=worker)
    with deferring_signals() as latch:  # a signal ends the trial in flight, never starts one
        while not stop_requested():
            asked = time.perf_counter()
            trial = ask(study, search)
            if trial is None:
                break
            run_trial(study, trial, search, log, time.perf_counter() - asked)
        return latch.signum


def reference(search: Search, log: Callable[[str], None] = print) -> dict[str, float]:
    """Evaluate the baselines (finished ones are kept) and return the target's accuracy on the
    selection part of each retain task (ReferenceFailed when one, or its forget accuracy, has
    no number)."""
    states = {}
    for point in search.baselines:
        state = run_point(point)
        with Store(search.store) as store:  # the report's baseline rows
            store.ingest(point.run_dir)
        states[point.id] = state
        log(f"baseline {point.baseline.label}: {state.status}")
    target = states[search.baselines[0].id]
    values = {t: target.retains.get(search.selection(t)) for t in search.retain_tasks}
    numbers = [target.forget, *values.values()]  # the forget: whether a trial unlearned at all
    if target.status != "done" or not all(isinstance(v, float) for v in numbers):
        why = target.error or target.status
        raise ReferenceFailed(
            f"the reference ({search.baselines[0].baseline.label}) has no result: {why}"
        )
    return values  # type: ignore[return-value]


def run_search(
    search: Search,
    workers: int = 1,
    executor: str = "local",
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run (or continue) the search to its budget; writes the outputs and returns them."""
    check_out(search.out, "search", search.models)  # new, empty or this search's own
    with sweep_lock(search.out, "search"):
        study = open_study(search)
        check_spec(study, search)
        ref = reference(search, log)
        if study.user_attrs.get(REFERENCE) is None:
            study.set_user_attr(REFERENCE, ref)
        elif study.user_attrs[REFERENCE] != ref:
            raise UsageError(f"{search.journal}: the reference changed since the study started")
        for number in recover(study, search):
            log(f"[trial {number}] interrupted by an earlier search: queued again")
        if executor == "local" and workers == 1:
            stopped = work(search, 0, log) is not None
        elif executor == "local":
            stopped = _local_workers(search, workers)
        else:
            _submitit_workers(search, workers, CLUSTERS[executor], log)
            stopped = False  # each job ends on its own signal; the rerun continues the study
        result = collect(search, open_study(search))
        write_outputs(search, result)
    if stopped:
        raise SearchStopped("stopped by a signal: rerun the same command to continue")
    return result


def _local_workers(search: Search, workers: int) -> bool:
    """N spawned workers; whether a stop signal ended them (the pool forwards it)."""
    with WorkerPool(workers) as pool:
        jobs = [pool.submit(work, search, i) for i in range(workers)]
        pool.wait(jobs, on_done=lambda f: f.result())
    return pool.signum is not None or any(
        not j.cancelled() and j.result() is not None for j in jobs
    )


def _submitit_workers(search: Search, workers: int, cluster: str, log) -> None:
    """N submitit jobs, each a worker on the shared study (SLURM or submitit's local one)."""
    import submitit

    executor = submitit.AutoExecutor(folder=Path(search.out) / JOBS_DIR, cluster=cluster)
    settings = search.slurm or _default_slurm()
    executor.update_parameters(**settings.parameters(f"unlearn-search-{search.name}"))
    jobs = [executor.submit(work, search, i) for i in range(workers)]
    log(f"{workers} worker job(s): {', '.join(str(j.job_id) for j in jobs)}")
    for job in jobs:
        try:
            job.result()
        except Exception as e:  # a lost worker loses only its trial in flight (recovered later)
            log(f"worker job {job.job_id} failed: {type(e).__name__}: {str(e).splitlines()[0]}")


def _default_slurm():
    from unlearn.sweep.spec import SlurmSettings

    return dataclasses.replace(SlurmSettings())
