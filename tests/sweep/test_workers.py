"""Local parallel workers: every point once, the store complete, the cores split, bad input."""

from __future__ import annotations

import pytest

from unlearn import cli
from unlearn.errors import UsageError
from unlearn.runs.store import Store
from unlearn.sweep.execute import run_sweep
from unlearn.sweep.slurm import make_executor
from unlearn.sweep.spec import load_sweep
from unlearn.sweep.workers import WorkerPoolExecutor, threads_per_worker

from .helpers import base_spec, write_spec


def test_threads_are_split_between_the_workers():
    assert threads_per_worker(2, cores=2) == 1
    assert threads_per_worker(1, cores=2) == 2
    assert threads_per_worker(3, cores=16) == 5
    assert threads_per_worker(4, cores=2) == 1  # never 0


def test_bad_worker_counts_are_one_line(tiny_world, tmp_path, capsys):
    spec = write_spec(tmp_path, base_spec(tiny_world))
    assert cli.main(["sweep", str(spec), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    sweep = load_sweep(spec)
    with pytest.raises(UsageError, match="local executor"):
        make_executor("submitit-local", sweep, workers=2)
    with pytest.raises(UsageError, match="--workers"):
        WorkerPoolExecutor(0)


def test_two_workers_run_every_point_once_and_index_every_row(tiny_world, tmp_path):
    spec = write_spec(tmp_path, base_spec(tiny_world, grid={"retain_coef": [1, 5, 20]}))
    sweep = load_sweep(spec)
    lines: list[str] = []
    states = run_sweep(sweep, WorkerPoolExecutor(2, log=lines.append), log=lines.append)
    assert [s.status for s in states] == ["done"] * 3
    starts = [line for line in lines if "starting" in line]
    assert len(starts) == 3 and len({s.split()[1] for s in starts}) == 3  # each point once
    with Store(sweep.store) as store:
        for p in sweep.points:
            assert store.run(p.id).status == "done"
            assert set(store.final_evals(p.id)) == {*tiny_world.questions, *tiny_world.perplexity}
    # More workers than points left: fewer workers, said in one line; nothing left to run here.
    again = run_sweep(load_sweep(spec), WorkerPoolExecutor(8, log=lines.append), log=lines.append)
    assert [s.status for s in again] == ["done"] * 3


def test_more_workers_than_points_uses_fewer(tiny_world, tmp_path):
    spec = write_spec(tmp_path, base_spec(tiny_world, grid={"retain_coef": [1]}))
    lines: list[str] = []
    states = run_sweep(load_sweep(spec), WorkerPoolExecutor(2, log=lines.append), log=lines.append)
    assert [s.status for s in states] == ["done"]
    assert any("1 point(s) to run, 1 worker(s)" in line for line in lines)


def test_pool_starts_background_jobs_last_and_returns_failures_as_results():
    import math

    from unlearn.sweep.workers import WorkerPool

    started: list[str] = []
    ended: list[str] = []
    with WorkerPool(1) as pool:
        jobs = {  # the background job is queued first, as the demo queues its reference attacks
            pool.submit(
                math.sqrt, 9.0, background=True, on_start=lambda: started.append("bg")
            ): "bg",
            pool.submit(math.sqrt, 4.0, on_start=lambda: started.append("a")): "a",
            pool.submit(math.sqrt, -1.0, on_start=lambda: started.append("bad")): "bad",
        }
        assert started == []  # nothing starts before the pool is waited on
        pool.wait(jobs, lambda f: ended.append(jobs[f]))
    assert started == ["a", "bad", "bg"]  # the background job waited for the queue to empty
    assert sorted(ended) == ["a", "bad", "bg"]
    results = {name: f for f, name in jobs.items()}
    assert results["a"].result() == 2.0 and results["bg"].result() == 3.0
    assert isinstance(results["bad"].exception(), ValueError)  # a failure, never a number


def test_a_worker_process_starts_with_the_library_chatter_silenced(monkeypatch):
    # A spawned worker starts with fresh logger levels: its initializer must silence them again.
    import logging

    import torch

    from unlearn.quiet import start_worker

    torchao_log = logging.getLogger("torchao")
    monkeypatch.setattr(torchao_log, "level", logging.WARNING)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        start_worker(threads)
    finally:
        torch.set_num_threads(threads)
    assert torchao_log.level == logging.ERROR


def test_the_worker_initializer_module_imports_no_heavy_library():
    # A spawned worker imports the initializer's module before the initializer runs: that import
    # must not pull in transformers (and with it torchao, whose warnings it is there to silence).
    import subprocess
    import sys

    code = "import sys, unlearn.quiet; print(sorted({'transformers', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
