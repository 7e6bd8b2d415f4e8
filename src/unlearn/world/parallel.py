"""The filtered twin's phase 2 in a spawned process, beside the target's phase 2.

    with TwinProcess(job, model, optimizer, threads=1) as twin:
        target_phase2 = train_phase(model, optimizer, ...)   # the target's phase 2, here
        filtered, filtered_phase2 = twin.result()

Design choices:

- After phase 1 the two phase-2 runs share nothing (own data stream, own copy of the phase-1
  weights and optimizer state), so they can run at once. On 2 cores, two processes x 1 thread
  finish the default preset's phase 2 in 169-175 s against about 190 s for one process x 2
  threads running one after the other (measured in CHANGELOG.md): a smaller gain than the sweep's
  workers get, since pretraining batches (32 x 64 tokens) use a second thread better.
- Spawned, never forked: the parent already runs torch's thread pools. The child runs the same
  `train_twin` as a sequential build, so with the same thread count both give bit-identical
  weights (tested).
- Tensors travel through files, not pipes: the phase-1 state is saved (`torch.save`) into a
  temp directory before the parent trains on (the parent's tensors change in place), and the
  child saves the trained twin's state dict and its `PhaseResult` numbers there, written under a
  temp name and renamed, so a result file is whole or absent. A build puts that directory
  inside its atomic build directory, so a failed build removes it with the rest.
- No orphans: leaving the `with` block for any reason (an error, Ctrl-C) terminates and joins a
  child still running and removes the temp directory. The child exits by itself when its parent
  dies without cleaning up (SIGKILL, an unhandled SIGTERM), and it starts with Ctrl-C ignored:
  the parent alone gets it and stops the child, so the terminal shows one "interrupted" line
  instead of a second traceback. SIGTERM makes the child exit through SystemExit, so its exit
  handlers run (else the resource tracker warns about the semaphore of the child's tqdm lock).
- Errors: a child that raises writes its exception in one line, which the parent raises as
  `TwinProcessError`; a child that dies (out of memory, killed) is reported by its exit code or
  signal.
- Progress: the child draws no bar (two processes drawing bars on one terminal garble them); the
  parent's bar for the target says the twin runs beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import torch
from transformers import GPTNeoXForCausalLM

from unlearn.world.phases import PhaseResult, TwinJob, make_model, train_twin

PHASE1_FILE = "phase1.pt"
RESULT_FILE = "twin.pt"
ERROR_FILE = "error.txt"
STOP_GRACE_S = 10.0
"""How long a terminated child gets to exit before it is killed."""


class TwinProcessError(RuntimeError):
    """The filtered twin's phase-2 process failed or died."""


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class TwinProcess:
    """The twin's phase 2 running in a spawned process for the duration of a `with` block."""

    def __init__(
        self,
        job: TwinJob,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        threads: int,
        workdir: Path | None = None,
    ) -> None:
        self.job, self.model, self.optimizer = job, model, optimizer
        self.threads, self.workdir = threads, workdir

    def __enter__(self) -> TwinProcess:
        self.dir = Path(tempfile.mkdtemp(prefix=".twin-", dir=self.workdir))
        try:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            torch.save(state, self.dir / PHASE1_FILE)
            context = multiprocessing.get_context("spawn")
            self.process = context.Process(
                target=_child_main,
                args=(self.job, self.threads, str(self.dir), os.getpid()),
                name="filtered-twin-phase2",
                daemon=True,
            )
            with _sigint_ignored():  # inherited by the child, see the module docstring
                self.process.start()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        return self

    def result(self) -> tuple[GPTNeoXForCausalLM, PhaseResult]:
        """Wait for the child; the trained twin (eval mode) and its phase's numbers."""
        self.process.join()
        if self.process.exitcode != 0:
            raise TwinProcessError(f"phase 2 of the filtered twin {self._failure()}")
        saved = torch.load(self.dir / RESULT_FILE, weights_only=True)
        job = self.job
        twin = make_model(job.preset, job.vocab_size, job.eos_id, seed=0)  # weights loaded next
        twin.load_state_dict(saved["model"])
        return twin.eval(), PhaseResult(**saved["result"])

    def _failure(self) -> str:
        error = self.dir / ERROR_FILE
        if error.is_file():
            return f"failed in its process: {error.read_text().strip()}"
        code = self.process.exitcode
        if code is not None and code < 0:  # died of a signal
            return f"process was killed by {signal.Signals(-code).name}"
        if code == 128 + signal.SIGTERM:  # see _exit_on_sigterm
            return "process was stopped by SIGTERM"
        return f"process exited with code {code} without a result"

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(STOP_GRACE_S)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored inside the block. A child started here inherits the ignore (Python keeps an
    inherited SIG_IGN for SIGINT); the parent's Ctrl-C is lost only during the start itself."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread; the child then gets Ctrl-C too
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _exit_with_parent(parent: int) -> None:
    """Exit when the parent is gone: reparented, getppid() changes (polled once a second)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _child_main(job: TwinJob, threads: int, workdir: str, parent: int) -> None:
    """Child process: train the twin from the saved phase-1 state, save its state and numbers."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _exit_with_parent(parent)
    torch.set_num_threads(threads)
    out = Path(workdir)
    try:
        state = torch.load(out / PHASE1_FILE, weights_only=True)
        twin, result = train_twin(job, state["model"], state["optimizer"], progress=False)
        numbers = {k: v for k, v in dataclasses.asdict(result).items() if k != "checkpoints"}
        partial = out / f"{RESULT_FILE}.partial"
        torch.save({"model": twin.state_dict(), "result": numbers}, partial)
        os.replace(partial, out / RESULT_FILE)
    except Exception as e:
        (out / ERROR_FILE).write_text(f"{type(e).__name__}: {e}")
        raise  # the child's traceback goes to stderr as well
