"""The budget lock: a worker killed inside it (SIGKILL: no cleanup runs) neither hangs the other
workers nor a rerun, and a waiting worker sleeps instead of spinning."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

from helpers import patch_runs, spec, write

from unlearn.commands.search import main
from unlearn.search.lock import SymlinkLock
from unlearn.search.spec import load_search
from unlearn.search.study import budget_lock
from unlearn.sweep.execute import sweep_lock

# Forked, not spawned: the children need nothing but the lock, and a spawned interpreter would
# import torch again (seconds on a loaded machine).
FORK = multiprocessing.get_context("fork")


def _hold(search, ready) -> None:
    with budget_lock(search):
        ready.set()
        time.sleep(120)  # killed long before


def _wait(search, waiting, results) -> None:
    waiting.set()
    wall, cpu = time.monotonic(), time.process_time()
    with budget_lock(search):
        results.put((time.monotonic(), time.monotonic() - wall, time.process_time() - cpu))


def _killed_holder(search):
    ready = FORK.Event()
    holder = FORK.Process(target=_hold, args=(search, ready))
    holder.start()
    assert ready.wait(30), "the holder never took the lock"
    return holder


def test_a_worker_killed_inside_the_budget_lock_holds_up_no_one(tiny_world, tmp_path, monkeypatch):
    patch_runs(monkeypatch, [])
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=2))
    search = load_search(path)
    with sweep_lock(search.out, "search"):  # OUT as an earlier run of this search left it
        pass

    # Another worker waits for the lock while its holder is alive, then the holder is killed.
    holder = _killed_holder(search)
    waiting, results = FORK.Event(), FORK.Queue()
    waiter = FORK.Process(target=_wait, args=(search, waiting, results))
    waiter.start()
    try:
        assert waiting.wait(30)
        time.sleep(1.0)
        killed = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)  # a zombie until joined: still dead to the lock
        acquired, waited, cpu = results.get(timeout=15)
    finally:  # a waiter that never got the lock must not outlive the test
        for process in (waiter, holder):
            if process.is_alive():
                process.kill()
            process.join(10)
    assert acquired - killed < 5
    assert cpu < 0.25 * waited  # it slept while the holder lived (a spinning waiter: ~100%)

    # A worker killed inside the lock with nobody waiting: the next search run goes on.
    holder = _killed_holder(search)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    assert os.path.islink(search.out / ".budget.lock")  # the dead holder's lock is left

    def hung(*_):
        raise TimeoutError("the search hung on the dead worker's lock")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)  # a hang ends the test; a loaded machine may take a while
    try:
        start = time.monotonic()
        assert main([str(path)]) == 0
        assert time.monotonic() - start < 90
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "2 of 2 trials ended" in (search.out / "search.md").read_text()


def test_a_holder_on_another_machine_is_taken_for_dead_only_after_stale_s(tmp_path):
    path = tmp_path / "lock"
    os.symlink("elsewhere|pid:[1]|123|token", path)  # no process here can say it is gone
    lock = SymlinkLock(path, stale_s=0.5)
    assert not lock.acquire(timeout=0.2)  # alive as far as anyone here can tell
    start = time.monotonic()
    assert lock.acquire(timeout=5)
    assert 0.2 < time.monotonic() - start < 3
    lock.release()
    assert not os.path.lexists(path)
