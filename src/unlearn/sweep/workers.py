"""Local parallel workers: N sweep points at once, each in its own process, the cores split.

    run_sweep(sweep, WorkerPoolExecutor(workers=2))      # `unlearn sweep SPEC --workers 2`

Design choices:
- Processes, not threads: a point is a whole training run (the GIL, torch's global thread pool,
  signal handlers and the run lifecycle are per process). Workers are spawned (a fresh
  interpreter: forking a process that already runs torch threads is unsafe) and each runs
  points with `run_point`, like the sequential executor, so a point does the same work wherever
  it runs.
- The cores are split: each worker uses cores // N torch threads (at least 1), set when it
  starts (and OMP_NUM_THREADS for anything it launches). Tiny models scale poorly with threads,
  so 2 workers x 1 thread beat 1 worker x 2 threads on 2 cores (README, issue 14).
- At most N points are in flight; the next starts when one ends, so `on_start` is when a point
  really starts. More workers than points: as many workers as points, said in one line.
- Run directories and the store are as with one worker: each point writes its own directories;
  runs index themselves in the store (SQLite WAL: safe across processes on one machine) and the
  driver ingests each finished point again.
- Signals: SIGTERM/SIGUSR1/SIGUSR2 to the driver stop it from starting points, are forwarded to
  the workers (a training run checkpoints and ends "preempted"; a worker that was loading or
  evaluating latches it like the sequential sweep does), and the sweep ends with SweepPreempted
  once the points in flight have ended. Rerunning resumes.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool

from unlearn.errors import UsageError
from unlearn.resume import deferring_signals
from unlearn.runs.rows import RunMeta
from unlearn.sweep.execute import Executor, OnDone, OnStart, SweepPreempted, record_failure
from unlearn.sweep.execute import run_point as _run_point
from unlearn.sweep.points import Point
from unlearn.sweep.state import PointState, inspect_point
from unlearn.world.parallel import available_cores


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Torch threads for each of `workers` processes sharing `cores` (at least 1)."""
    return max(1, (cores or available_cores()) // workers)


def _start_worker(threads: int) -> None:
    import torch  # already imported by the modules this worker unpickled; threads set now

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _run_in_worker(point: Point) -> PointState:
    # A stop signal that arrives while the point loads or evaluates is latched, not fatal: the
    # training checkpoints at its next step and the attack does not start (as in one process).
    with deferring_signals():
        return _run_point(point)


class WorkerPoolExecutor(Executor):
    """Up to `workers` points at once, in spawned worker processes (see the module docstring)."""

    def __init__(self, workers: int, log: Callable[[str], None] = print) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise UsageError(f"--workers must be an integer >= 1, got {workers!r}")
        self.workers, self.log = workers, log

    def submit(self, points: Sequence[Point], on_start: OnStart, on_done: OnDone) -> None:
        if not points:
            return
        n = min(self.workers, len(points))
        if n < self.workers:
            self.log(f"--workers {self.workers}: {len(points)} point(s) to run, {n} worker(s)")
        threads = threads_per_worker(n)
        queue = list(points)
        running: dict[futures.Future, Point] = {}
        context = multiprocessing.get_context("spawn")
        with (
            deferring_signals() as latch,
            futures.ProcessPoolExecutor(
                n, mp_context=context, initializer=_start_worker, initargs=(threads,)
            ) as pool,
        ):

            def start_next() -> None:
                point = queue.pop(0)
                on_start(point)
                running[pool.submit(_run_in_worker, point)] = point

            while queue and len(running) < n:
                start_next()
            forwarded = False
            last = points[0]
            while running:
                done, _ = futures.wait(running, timeout=0.5, return_when=futures.FIRST_COMPLETED)
                if latch.signum is not None and not forwarded:
                    forwarded = True
                    queue.clear()
                    for child in multiprocessing.active_children():
                        os.kill(child.pid, latch.signum)
                for future in done:
                    point = last = running.pop(future)
                    on_done(point, _state(point, future))
                    if queue and latch.signum is None:
                        start_next()
        if latch.signum is not None:
            raise SweepPreempted(latch.signum, last.id)


def _state(point: Point, future: futures.Future) -> PointState:
    """The point's state; a worker that died (killed, out of memory) leaves its point failed."""
    try:
        return future.result()
    except (BrokenProcessPool, Exception) as e:  # run_point records its own failures
        reason = f"worker process ended: {type(e).__name__}: {e}"
        kind = "baseline" if point.baseline is not None else "unlearn"
        record_failure(point.run_dir, RunMeta(point.id, kind, point.method), reason)
        return inspect_point(point)
