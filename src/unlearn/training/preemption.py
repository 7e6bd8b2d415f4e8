"""Stop signals: SLURM's preemption notice and the pre-time-limit signals.

SLURM sends SIGTERM before it preempts a job (and, with `--signal=USR1@120` or submitit's
default, SIGUSR1/SIGUSR2 before the time limit). While training, those signals only set a flag
(`Checkpointer.catching_signals`); after the optimizer step in progress the loop writes a
checkpoint and raises `Preempted`, the recipe records status "preempted" and the command exits
with `EXIT_PREEMPTED` (75, sysexits' "temporary failure, retry"). Running the same command again
resumes from the checkpoint.

A caller that runs several trainings in a row (the local sweep executor) wraps them in
`deferring_signals()`: a signal then only sets a latch, so it stops after the current run
instead of starting the next one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

EXIT_PREEMPTED = 75
"""Exit status of a preempted command (EX_TEMPFAIL: run the same command again to resume)."""
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""SIGTERM: SLURM's preemption notice. SIGUSR1/SIGUSR2: the usual pre-time-limit signals
(`#SBATCH --signal=USR1@120`; submitit asks SLURM for USR2)."""


class SignalLatch:
    """The first stop signal caught inside `deferring_signals()` (None: none yet)."""

    def __init__(self) -> None:
        self.signum: int | None = None


_latch: SignalLatch | None = None
"""The innermost active `deferring_signals()` latch."""


@contextlib.contextmanager
def deferring_signals() -> Iterator[SignalLatch]:
    """Inside, SIGTERM/SIGUSR1/SIGUSR2 only set the yielded latch, for a caller that runs
    several trainings in a row (a sweep) and must stop after the current one instead of
    starting the next. A training inside (`Checkpointer.catching_signals`) also sets the latch
    when it is signalled, and one that starts after a signal was latched checkpoints after its
    first step and raises Preempted: the signal was meant for it (SLURM's notice arrived while
    it loaded its model), and SIGKILL follows the notice. Main thread only, like any handler.
    """
    global _latch
    latch = SignalLatch()
    if threading.current_thread() is not threading.main_thread():
        yield latch
        return

    def request(signum: int, frame: object) -> None:
        latch.signum = latch.signum or signum

    previous = {s: signal.signal(s, request) for s in SIGNALS}
    outer, _latch = _latch, latch
    try:
        yield latch
    finally:
        _latch = outer
        for s, handler in previous.items():
            signal.signal(s, handler)


def current_latch() -> SignalLatch | None:
    """The innermost active `deferring_signals()` latch (None outside one)."""
    return _latch


def stop_requested() -> bool:
    """Whether the enclosing `deferring_signals()` caught a signal (False outside one)."""
    return _latch is not None and _latch.signum is not None


def exit_code(status: str, ok: tuple[str, ...]) -> int:
    """A command's exit status for a run status: 0 for `ok` ones, EXIT_PREEMPTED, else 1."""
    if status in ok:
        return 0
    return EXIT_PREEMPTED if status == "preempted" else 1
