"""The shape every training recipe shares, written once.

    launch = regime.launch()        # the regime: every check that needs no weights, OUT included
    suite data -> processes -> the run opened (run.json, resume, store)
    trainee = regime.build(session) # the regime: examples, model, wrapping, plan
    train(...)                      # the one training loop, checkpointing on a stop signal
    regime.finish(session, ...)     # the regime: save, evaluate

A regime is one kind of training run: unlearning (`recipes.unlearning`), the tamper attack
(`recipes.attack`) and distillation (`recipes.distill`). Each supplies the three parts above;
the order of the steps between them, and what is checked before any weights load, are the same
for all of them because they are written here only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from unlearn.data import ExampleStream
from unlearn.distributed import Parallel, setup
from unlearn.eval.suite import PreparedSuite, Suite, prepare_suite
from unlearn.models.gradient_checkpointing import check_gradient_checkpointing
from unlearn.models.refs import ModelRef
from unlearn.runs.lifecycle import ActiveRun, run_lifecycle
from unlearn.runs.rows import RunMeta, utc_now
from unlearn.runs.rundir import check_run_out
from unlearn.runs.store import check_store
from unlearn.tracking import TrackingArgs
from unlearn.training.checkpointer import Checkpointer
from unlearn.training.frozen_cache import FrozenCache
from unlearn.training.loop import Plan, TrainState, train


def check_destination(out: str, kind: str, inputs: dict[str, Any], store: str | None) -> Path:
    """The run directory OUT, checked before anything is written or loaded (new, empty, or a
    run directory of this kind that does not hold an input), and the store, if any."""
    checked = check_run_out(out, kind, inputs)
    if store:
        check_store(store)
    return checked


@dataclass
class Launch:
    """What a regime resolved before anything heavy: which run, where, evaluated on what."""

    kind: str
    """run.json's kind (`unlearn`, `attack`)."""
    out: Path
    """The run directory, already checked (`check_destination`)."""
    config: dict[str, Any]
    """The run's configuration as recorded in run.json (and compared on resume)."""
    train: Any
    """The `TrainConfig`."""
    suite: Suite | None
    """The evaluation suite, resolved (None: no evaluation)."""
    run_id: str | None = None
    store: str | None = None
    method: str | None = None
    parent: str | None = None
    model: ModelRef | None = None
    """The model that will train, checked for what the training settings need before it loads."""
    resumable: bool = True
    """Write checkpoints (periodically and on a stop signal) and resume from them."""
    progress: bool = True
    tracking: TrackingArgs | None = None
    """Experiment trackers to report the run to (`unlearn.tracking`; not part of its config)."""


@dataclass
class Session:
    """The open run a regime builds its trainee in and finishes."""

    run: ActiveRun
    parallel: Parallel
    suite: PreparedSuite | None
    out: Path


@dataclass
class Trainee:
    """What the training loop runs: the model, the objective (a method or an objective), the
    frozen reference, the data and the plan, with the regime's per-step callback."""

    model: torch.nn.Module
    objective: Any
    tokenizer: Any
    forget: ExampleStream
    plan: Plan
    reference: Any = None
    retain: ExampleStream | None = None
    on_step: Callable[[int], None] | None = None
    frozen_cache: FrozenCache | None = None


class Regime(Protocol):
    def launch(self) -> Launch: ...

    def build(self, session: Session) -> Trainee: ...

    def finish(self, session: Session, trainee: Trainee, state: TrainState) -> None: ...


def run_regime(regime: Regime) -> RunMeta:
    """Launch, open the run, build, train, finish. Returns the final RunMeta: the lifecycle
    decides its status (done, collapsed, diverged, preempted, pruned or failed) whatever ends
    the run."""
    launch = regime.launch()  # nothing heavy before this has passed
    if launch.train.gradient_checkpointing and launch.model is not None:
        check_gradient_checkpointing(launch.model)
    # Benchmarks' datasets are loaded now: one missing offline is bad input, found before any
    # weights load or any step is trained.
    suite = prepare_suite(launch.suite) if launch.suite is not None else None
    tcfg = launch.train
    par = setup(tcfg.distributed, tcfg.collective_timeout)
    checkpointer = None
    if launch.resumable:
        checkpointer = Checkpointer(launch.out, launch.config, every=tcfg.checkpoint_every)
    roles = {"suite": launch.suite.roles()} if launch.suite is not None else {}
    fresh = RunMeta(
        id=launch.run_id or launch.out.name,
        kind=launch.kind,
        method=launch.method,
        config={**launch.config, **roles},
        status="running",
        started=utc_now(),
        parent=launch.parent,
    )
    # Resumes when OUT holds a checkpoint of this config; records how the run ends.
    with run_lifecycle(fresh, launch.out, par, checkpointer, launch.store, launch.tracking) as run:
        session = Session(run, par, suite, launch.out)
        torch.manual_seed(tcfg.seed)
        t = regime.build(session)
        signals = checkpointer.catching_signals() if checkpointer else contextlib.nullcontext()
        with signals:
            state = train(
                t.model,
                t.objective,
                t.reference,
                t.forget,
                t.retain,
                tcfg,
                t.plan,
                state=TrainState(),
                on_log=run.log,
                on_timing=run.log_timing,
                on_step=t.on_step,
                progress=launch.progress,
                device=par.device,
                parallel=par,
                checkpointer=checkpointer,
                frozen_cache=t.frozen_cache,
            )
        regime.finish(session, t, state)
    return run.meta
