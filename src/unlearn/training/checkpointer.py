"""Resumable checkpoints of a training run, written periodically and on a stop signal.

    checkpointer = Checkpointer(out, config, every=cfg.checkpoint_every)
    with run_lifecycle(fresh_meta, out, checkpointer=checkpointer) as run:  # unlearn.runs
        with checkpointer.catching_signals():
            state = train(..., checkpointer=checkpointer)     # raises Preempted on SIGTERM

Design choices:
- What is saved: the trainable parameters (LoRA adapters, or every weight in full fine-tuning),
  the optimizer state (every optimizer of a `MultiOptimizer`: AdamW and Muon), the `TrainState`
  (step, the divergence guard's first values, the retain guard), and the RNG states (python,
  torch CPU, CUDA) of every rank. Nothing else is needed: micro-batch k of the data streams and
  its random-target generator are pure functions of (seed, k), k is a function of the step, and
  the LR and coefficient schedules are pure functions of the step, so "data position", "scheduler"
  and "coefficient schedule position" are all the saved step. Frozen parts (the base model, a full
  fine-tuning reference copy, lenses, affine maps, source checkpoints) are rebuilt from their
  files exactly as in the first attempt, before the checkpoint is loaded.
- Tensors go through `torch.distributed.checkpoint.state_dict` (`get_state_dict` /
  `set_state_dict` with `full_state_dict`), so one code path serves one process, DDP and FSDP2:
  a full (gathered, unsharded) state dict on CPU, keyed by parameter names, written by rank 0 and
  read by every rank (`set_state_dict` reshards it). Files are plain `torch.save` archives,
  loaded with `weights_only=True`.
- Atomicity: a checkpoint is a directory `OUT/checkpoint/step-NNNNNNNN`, built in a hidden temp
  sibling, every file fsynced, renamed into place, the parent fsynced; only then are older
  checkpoints deleted. The newest `step-*` directory is the checkpoint. A kill -9 at any moment
  therefore leaves the previous checkpoint, the new one, or both; never a partial one (temp
  directories are hidden and removed by the next writer).
- state.json records each tensor file's size and sha256, hashed while torch.save writes it (no
  second read). Resuming verifies them before any weights load: a damaged newest checkpoint
  (cut short or altered after it was written) gives way to an older one if one is left, else
  it is a UsageError saying how to restart. Under torchrun rank 0 verifies for every rank.
- A checkpoint records the run's configuration; resuming under a different one (another learning
  rate, another world size) is a UsageError, one line, before any weights load. Fields that
  cannot change the result (`checkpoint_every`, `progress`) may differ.
- Resuming from step s drops metric and eval rows logged after step s (a kill -9 between
  checkpoints leaves some), so the resumed run's files equal an uninterrupted run's.
- Signal handlers exist only inside `catching_signals()` and are restored on exit; outside
  training (model loading, saving, evaluation) a signal keeps its usual effect, and the next
  attempt resumes from the last checkpoint. A caller that runs several trainings in a row (the
  local sweep executor) wraps them in `deferring_signals()`: a signal then only sets a latch,
  so it stops after the current run instead of starting the next one, and a run that starts
  after the latch was set checkpoints at its first step. Under torchrun the ranks agree on the
  flag (an all-reduce per step), so every rank checkpoints at the same step.
- A finished run deletes its checkpoint (`discard`): for a 7B model the optimizer state alone is
  tens of gigabytes, and a finished run is never resumed."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from unlearn import distributed
from unlearn.config.settings import ADDED_FIELDS, OPERATIONAL_FIELDS
from unlearn.errors import Preempted, UsageError
from unlearn.fsutil import atomic_write_text
from unlearn.runs.rundir import CHECKPOINT_DIR, STEP_PREFIX, checkpoints
from unlearn.training.optim import torch_optimizers
from unlearn.training.preemption import SIGNALS, current_latch
from unlearn.training.tensor_files import (
    FORMAT,
    TENSOR_FILES,
    damage,
    fsync_dir,
    read_info,
    save_tensors,
)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The config as JSON would give it back, without the fields a resume may change."""
    normal = {**ADDED_FIELDS, **json.loads(json.dumps(config))}
    return {k: v for k, v in normal.items() if k not in OPERATIONAL_FIELDS}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Writes and restores the resumable checkpoints of one run directory."""

    def __init__(self, run_dir: str | os.PathLike, config: dict[str, Any], every: int = 0) -> None:
        if every < 0:
            raise UsageError(f"--checkpoint_every must be >= 0, got {every}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINT_DIR
        self.config = _comparable(config)
        self.every = every
        self.signum: int | None = None
        """The signal caught while training (None: none yet)."""
        self._damage: dict[Path, str | None] = {}
        """`damage()` of the checkpoints verified so far (find runs before the model loads and
        again in restore: the files are read once)."""

    # -- before any weights load ----------------------------------------------------------------

    def find(self) -> dict[str, Any] | None:
        """The newest intact checkpoint's state.json (with its "path"), after checking that it
        was made by this configuration and world size (UsageError otherwise); None when there
        is none. A damaged checkpoint (a file cut short or altered since it was written) gives
        way to an older one when one is left, else it is a UsageError saying how to restart:
        either way before any weights load."""
        damaged: tuple[Path, str] | None = None
        for path in checkpoints(self.run_dir):
            try:
                info = read_info(path)
            except UsageError as e:
                problem: str | None = str(e)
            else:
                self._check(path, info)  # a changed config is reported before any file is read
                problem = self._verify(path, info)
            if problem is None:
                if damaged is not None and distributed.is_main():
                    print(
                        f"checkpoint {damaged[0]} is damaged ({damaged[1]}); resuming from the"
                        f" older {path.name}",
                        file=sys.stderr,
                    )
                return {**info, "path": path}
            damaged = damaged or (path, problem)
        if damaged is None:
            return None
        raise UsageError(
            f"checkpoint {damaged[0]} is damaged ({damaged[1]}) and no older one is left:"
            f" remove {self.root} to start the run again from step 0, or use another --out"
        )

    def _verify(self, path: Path, info: dict[str, Any]) -> str | None:
        """`damage()`, computed once per checkpoint: by rank 0 alone under torchrun (every rank
        reading tens of gigabytes from a shared filesystem would multiply the cost), which
        hands the verdict to the others, so all ranks resume from the same checkpoint."""
        if path not in self._damage:
            problem = damage(path, info) if distributed.is_main() else None
            if distributed.world_size() > 1 and dist.is_initialized():
                verdict = [problem]
                # Rank 0 may read tens of gigabytes meanwhile: no collective timeout here.
                dist.broadcast_object_list(verdict, src=0, group=distributed.slow_group())
                problem = verdict[0]
            self._damage[path] = problem
        return self._damage[path]

    def _check(self, path: Path, info: dict[str, Any]) -> None:
        """UsageError unless this run may resume from a checkpoint with this state.json."""
        world_size = distributed.world_size()
        if info["world_size"] != world_size:
            raise UsageError(
                f"{path} was written by {info['world_size']} process(es), this run has"
                f" {world_size}: resume with the same number of processes or another --out"
            )
        saved = _comparable(info["config"])
        changed = sorted(
            k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k)
        )
        if changed:
            what = ", ".join(f"{k} {saved.get(k)!r} -> {self.config.get(k)!r}" for k in changed)
            raise UsageError(
                f"{self.run_dir} holds a checkpoint of a different configuration ({what});"
                " rerun with the same settings or use another --out"
            )

    # -- signals --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[Checkpointer]:
        """Turn SIGTERM/SIGUSR1/SIGUSR2 into a checkpoint-and-stop request while inside.

        Handlers can only be set from the main thread; elsewhere (a library calling the recipe
        from a worker thread) signals keep their usual effect and only periodic checkpoints run.
        """
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        latch = current_latch()
        if latch is not None and latch.signum is not None:
            self.signum = latch.signum  # caught before training started: stop at the first step

        def request(signum: int, frame: object) -> None:
            self.signum = signum
            if latch is not None:  # tell the enclosing sweep too: it stops after this run
                latch.signum = latch.signum or signum

        previous = {s: signal.signal(s, request) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_requested(self, model: nn.Module) -> bool:
        """Whether any rank caught a signal (every rank must checkpoint at the same step)."""
        world_size = distributed.world_size()
        if world_size == 1:
            return self.signum is not None
        device = next(model.parameters()).device
        flag = torch.tensor([0 if self.signum is None else self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
            latch = current_latch()
            if latch is not None:  # another rank was signalled: this rank's sweep stops too
                latch.signum = latch.signum or self.signum
        return bool(flag.item())

    # -- during training ------------------------------------------------------------------------

    def after_step(self, model: nn.Module, optimizer: Any, state: Any, total_steps: int) -> None:
        """Called by the loop after each optimizer step: save periodically; on a signal, save
        and raise Preempted."""
        stop = self._stop_requested(model)
        periodic = self.every > 0 and state.step % self.every == 0 and state.step < total_steps
        if stop or periodic:
            path = self.save(model, optimizer, state)
            if stop:
                raise Preempted(state.step, self.signum or signal.SIGTERM, path)

    def save(self, model: nn.Module, optimizer: Any, state: Any) -> Path:
        """Write a checkpoint of the current step atomically; returns its directory."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        rank, world_size = distributed.rank(), distributed.world_size()
        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
        )
        model_sd, optim_sd = get_state_dict(model, torch_optimizers(optimizer), options=options)
        rng = [_rng_state()]
        if world_size > 1:
            rng = [None] * world_size
            dist.all_gather_object(rng, _rng_state())
        final = self.root / f"{STEP_PREFIX}{state.step:08d}"
        error: BaseException | None = None
        if rank == 0:
            try:
                self._write(final, model_sd, optim_sd, rng, state, world_size)
            except Exception as e:
                if world_size == 1:
                    raise
                error = e
        if world_size > 1:
            # Rank 0 tells the others how its write went (a full disk must end every rank, not
            # leave them waiting), after writing alone for as long as it takes: no timeout.
            message = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(message, src=0, group=distributed.slow_group())
            if error is not None:
                raise error
            if message[0] is not None:
                raise OSError(f"rank 0 could not write checkpoint {final}: {message[0]}")
        return final

    def _write(self, final, model_sd, optim_sd, rng, state, world_size: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{STEP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed writer's temp directory
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=self.root))
        try:
            files = {
                name: save_tensors(obj, tmp / name)
                for name, obj in zip(TENSOR_FILES, (model_sd, optim_sd, rng), strict=True)
            }
            info = {
                "format": FORMAT,
                "step": state.step,
                "world_size": world_size,
                "config": self.config,
                "train_state": dataclasses.asdict(state),
                "files": files,
            }
            atomic_write_text(tmp / "state.json", json.dumps(info, indent=2) + "\n")
            fsync_dir(tmp)
            if final.exists():  # the same step saved twice (a signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.root.glob(f"{STEP_PREFIX}*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, model: nn.Module, optimizer: Any, state_cls: type) -> Any | None:
        """Load the newest checkpoint into model, optimizer and the RNGs; returns its
        TrainState (an instance of state_cls), or None when there is no checkpoint."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        info = self.find()
        if info is None:
            return None
        path: Path = info["path"]
        rank = distributed.rank()

        def load(name: str) -> Any:
            try:
                return torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
                # Only a checkpoint without recorded checksums (an older one) gets here damaged.
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UsageError(
                    f"checkpoint {path} is damaged ({name}: {first}): remove {self.root} to"
                    " start the run again from step 0, or use another --out"
                ) from None

        set_state_dict(
            model,
            torch_optimizers(optimizer),
            model_state_dict=load("model.pt"),
            optim_state_dict=load("optimizer.pt"),
            # Frozen parameters are not in the checkpoint: they come from the model's files.
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        _set_rng_state(load("rng.pt")[rank])
        print(f"resumed from {path} (step {info['step']})", file=sys.stderr)
        return state_cls(**info["train_state"])

    def discard(self) -> None:
        """Delete the checkpoints (the run finished; rank 0 only)."""
        if distributed.is_main():
            shutil.rmtree(self.root, ignore_errors=True)
