"""Local parallel workers: jobs (sweep points, attacks) in N processes at once, the cores split.

    run_sweep(sweep, WorkerPoolExecutor(workers=2))      # `unlearn sweep SPEC --workers 2`

    with WorkerPool(2) as pool:                          # a campaign sharing one pool
        attack = pool.submit(run_attack_job, cfg, background=True)
        run_sweep(sweep, WorkerPoolExecutor(2, pool=pool))
        pool.wait([attack])

Design choices:
- Processes, not threads: a job is a whole training run (the GIL, torch's global thread pool,
  signal handlers and the run lifecycle are per process). Workers are spawned (a fresh
  interpreter: forking a process that already runs torch threads is unsafe); a point runs with
  `run_point`, like the sequential executor, so it does the same work wherever it runs.
- The cores are split: each worker uses cores // N torch threads (at least 1), set when it
  starts (and OMP_NUM_THREADS for anything it launches). Tiny models scale poorly with threads,
  so 2 workers x 1 thread beat 1 worker x 2 threads on 2 cores (measured in CHANGELOG.md).
- At most N jobs are in flight, in submission order; the next starts when one ends, so a job's
  `on_start` is when it really starts. Background jobs start only when no other job waits: a
  campaign's independent work (attacks on reference models) fills workers a sweep leaves idle
  instead of delaying the sweep. More workers than jobs: as many workers as jobs, said in one
  line.
- Run directories and the store are as with one worker: each job writes its own directories;
  runs index themselves in the store (SQLite WAL: safe across processes on one machine) and the
  driver ingests each finished point again.
- Signals: SIGTERM/SIGUSR1/SIGUSR2 to the driver stop it from starting jobs, are forwarded to
  the workers (a training run checkpoints and ends "preempted"; a worker that was loading or
  evaluating latches it like the sequential sweep does) and, once the jobs in flight have
  ended, the sweep ends with SweepPreempted. Rerunning resumes.
"""

from __future__ import annotations

import concurrent.futures as futures
import functools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from unlearn.errors import UsageError
from unlearn.quiet import start_worker
from unlearn.runs.rows import RunMeta
from unlearn.sweep.execute import Executor, OnDone, OnStart, SweepPreempted, record_failure
from unlearn.sweep.execute import run_point as _run_point
from unlearn.sweep.points import Point
from unlearn.sweep.state import PointState, inspect_point
from unlearn.training.preemption import deferring_signals
from unlearn.world.parallel import available_cores


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Torch threads for each of `workers` processes sharing `cores` (at least 1)."""
    return max(1, (cores or available_cores()) // workers)


def check_workers(workers: object) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--workers must be an integer >= 1, got {workers!r}")
    return workers


def _deferring(fn: Callable[..., Any], *args: Any) -> Any:
    # A stop signal that arrives while a job loads or evaluates is latched, not fatal: a training
    # checkpoints at its next step and nothing new starts (as in one process).
    with deferring_signals():
        return fn(*args)


class _Job:
    def __init__(self, call: Callable[[], Any], on_start: Callable[[], None] | None) -> None:
        self.call, self.on_start = call, on_start
        self.future: futures.Future = futures.Future()


class WorkerPool:
    """`workers` spawned processes running picklable jobs, at most `workers` at once.

    A context manager: entering it starts latching stop signals, leaving it waits for the jobs
    in flight (after a stop signal or an error, queued jobs are cancelled, never started).
    `submit` queues a job and returns its Future; `wait(futures)` starts queued jobs and runs
    the pool until those have ended (other jobs go on meanwhile). `signum` is the stop signal
    received, if any.
    """

    def __init__(self, workers: int, log: Callable[[str], None] = print) -> None:
        self.workers, self.log = check_workers(workers), log
        self.signum: int | None = None
        self._queue: deque[_Job] = deque()
        self._background: deque[_Job] = deque()
        self._running: dict[futures.Future, _Job] = {}

    def __enter__(self) -> WorkerPool:
        self._signals = deferring_signals()
        self._latch = self._signals.__enter__()
        context = multiprocessing.get_context("spawn")
        threads = threads_per_worker(self.workers)
        self._pool = futures.ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=start_worker, initargs=(threads,)
        )
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._cancel_queued()
            self._pool.shutdown(wait=True)  # the jobs in flight end (signalled ones checkpoint)
        finally:
            self._signals.__exit__(*exc)

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        background: bool = False,
        on_start: Callable[[], None] | None = None,
    ) -> futures.Future:
        """Queue `fn(*args)` (picklable) to run in a worker; background: only when idle."""
        job = _Job(functools.partial(_deferring, fn, *args), on_start)
        if self.signum is not None:
            job.future.cancel()
            return job.future
        # Started by `wait`, not here: a caller queues its background work first and its main
        # work after, and the main work must still start first.
        (self._background if background else self._queue).append(job)
        return job.future

    def wait(
        self,
        pending: Iterable[futures.Future],
        on_done: Callable[[futures.Future], None] | None = None,
    ) -> None:
        """Run the pool until every future in `pending` is done or cancelled, calling
        `on_done(future)` for each as it ends (in this process: exceptions propagate)."""
        left = list(pending)
        self._fill()
        while left:
            still = []
            for future in left:
                if not future.done():
                    still.append(future)
                elif on_done is not None:
                    on_done(future)
            left = still
            if left:
                self._pump()

    def _pump(self) -> None:
        if not self._running:  # every job was started, so something must be running
            raise RuntimeError("worker pool: waiting for jobs that were never started")
        done, _ = futures.wait(self._running, timeout=0.5, return_when="FIRST_COMPLETED")
        if self._latch.signum is not None and self.signum is None:
            self._stop(self._latch.signum)
        for real in done:
            job = self._running.pop(real)
            try:
                job.future.set_result(real.result())
            except BaseException as e:  # the job's failure is its result, raised where it is read
                job.future.set_exception(e)
        self._fill()

    def _fill(self) -> None:
        while len(self._running) < self.workers and self.signum is None:
            queue = self._queue or self._background
            if not queue:
                return
            job = queue.popleft()
            if not job.future.set_running_or_notify_cancel():
                continue
            if job.on_start is not None:
                job.on_start()
            try:
                self._running[self._pool.submit(job.call)] = job
            except BrokenProcessPool as e:  # a worker died earlier: this job cannot run either
                job.future.set_exception(e)

    def _stop(self, signum: int) -> None:
        self.signum = signum
        self._cancel_queued()
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    def _cancel_queued(self) -> None:
        for queue in (self._queue, self._background):
            while queue:
                queue.popleft().future.cancel()


class WorkerPoolExecutor(Executor):
    """Sweep points in worker processes (see the module docstring): its own pool of `workers`,
    or a shared `pool` that also runs other jobs (the demo's attacks)."""

    def __init__(
        self, workers: int, log: Callable[[str], None] = print, pool: WorkerPool | None = None
    ) -> None:
        self.workers, self.log, self.pool = check_workers(workers), log, pool

    def submit(self, points: Sequence[Point], on_start: OnStart, on_done: OnDone) -> None:
        if not points:
            return
        if self.pool is not None:
            self._run(self.pool, points, on_start, on_done)
            return
        n = min(self.workers, len(points))
        if n < self.workers:
            self.log(f"--workers {self.workers}: {len(points)} point(s) to run, {n} worker(s)")
        with WorkerPool(n, self.log) as pool:
            self._run(pool, points, on_start, on_done)

    def _run(
        self, pool: WorkerPool, points: Sequence[Point], on_start: OnStart, on_done: OnDone
    ) -> None:
        finished: list[Point] = []
        jobs = {
            pool.submit(_run_point, point, on_start=functools.partial(on_start, point)): point
            for point in points
        }

        def done(future: futures.Future) -> None:
            if not future.cancelled():  # a point never started is not reported
                finished.append(jobs[future])
                on_done(jobs[future], _state(jobs[future], future))

        pool.wait(jobs, done)
        if pool.signum is not None:
            raise SweepPreempted(pool.signum, (finished or points)[-1].id)


def _state(point: Point, future: futures.Future) -> PointState:
    """The point's state; a worker that died (killed, out of memory) leaves its point failed."""
    try:
        return future.result()
    except (BrokenProcessPool, Exception) as e:  # run_point records its own failures
        reason = f"worker process ended: {type(e).__name__}: {e}"
        kind = "baseline" if point.baseline is not None else "unlearn"
        record_failure(point.run_dir, RunMeta(point.id, kind, point.method), reason)
        return inspect_point(point)
