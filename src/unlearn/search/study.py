"""The Optuna study of a search: its storage, sampler, pruner, constraint and trial budget.

Design choices:
- Storage: Optuna's JournalStorage on one append-only file, OUT/study.journal, locked with
  `JournalFileSymlinkLock`. A search's workers may be SLURM jobs on several nodes sharing a
  network filesystem, where fcntl locks (and so SQLite, RDB storage over a file) are unreliable
  (SQLite's own FAQ warns about NFS); creating a symbolic link is atomic on NFS, and a journal
  only ever appends, so a killed writer cannot leave the study half-updated. No server needed.
- One study per OUT, named after the spec, with the spec's fingerprint (`Search.key`) in its
  user attributes: a study made by another spec (another goal, space or base) is refused.
- The budget counts trials that ended (complete, pruned, failed) and those in flight. Asking
  for a trial happens under a lock next to the journal (OUT/.budget.lock, a symlink lock too,
  `unlearn.search.lock`), so N workers never start more than `budget` trials between them; a
  worker killed while holding it does not hang the others or a rerun (its lock is broken).
  The journal's own lock is Optuna's: its link points at the journal, so a writer killed while
  appending (a few milliseconds) holds the others up for Optuna's grace period (30 s).
- A trial still "running" in the journal when a search starts was interrupted (the search
  lock rules out a live one): it is marked failed with `interrupted` and its parameters are
  enqueued again, so the rerun retries that configuration, resuming its run directory's
  checkpoint if it has one. Interrupted trials do not count against the budget.
- The constraint of a trial is one number, the largest shortfall of a retain task below
  reference - delta (<= 0: satisfied), set with `Trial.set_constraint` (Optuna >= 5): the
  constrained samplers (TPE, NSGA-II) and `best_trials` read it from there.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from unlearn.search.lock import SymlinkLock
from unlearn.search.spec import Search

if TYPE_CHECKING:
    import optuna

SPEC_KEY = "spec_key"
REFERENCE = "reference"
INTERRUPTED = "interrupted"
BUDGET_LOCK = ".budget.lock"
CONSTRAINT = "retain_shortfall"
"""The name of the trial constraint: max over retain tasks of (reference - delta - acc)."""


def _quiet() -> None:
    import optuna

    # Our own progress lines say what each trial did; Optuna's INFO lines would repeat them.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # TPE's `group` (a method's fields sampled together) is marked experimental; it is the
    # documented way to sample conditional spaces, and the warning would repeat per worker.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage(search: Search):
    """The study's journal storage (created on first use)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    path = str(search.journal)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileSymlinkLock(path)))


def sampler(search: Search, seed: int | None = None):
    """The spec's sampler, seeded with `seed` (default: the spec's)."""
    import optuna

    seed = search.seed if seed is None else seed
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    # Few trials: TPE starts modelling after a third of the budget (at most its default 10),
    # and samples the parameters jointly (a method's fields interact: lr with steps).
    startup = max(3, min(10, search.budget // 3))
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=startup,
        multivariate=True,
        group=search.several,
    )


def pruner(search: Search):
    import optuna

    if search.pruner == "median":
        # The first trials run to the end: a median of one trial would prune on noise.
        return optuna.pruners.MedianPruner(n_startup_trials=max(3, search.budget // 8))
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=search.intermediate)
    return optuna.pruners.NopPruner()


def directions(search: Search) -> list[str]:
    return ["maximize" if name == "retain" else "minimize" for name in search.objectives]


def open_study(search: Search, create: bool = True, worker: int = 0) -> optuna.Study | None:
    """The search's study (created when `create`; None when it does not exist yet).

    Its sampler's seed comes from the spec's seed, the worker's number and the trials the study
    already has: workers started together, and a continued study, draw new configurations
    instead of repeating the same random sequence (a search is reproducible for a given number
    of workers, run from the start in one go)."""
    import optuna

    _quiet()
    if not create and not search.journal.exists():
        return None
    kwargs = {"storage": storage(search), "pruner": pruner(search), "study_name": search.name}
    if not create:  # reading (--status) writes nothing, not even a new study's record
        try:
            return optuna.load_study(**kwargs)
        except KeyError:
            return None
    study = optuna.create_study(
        sampler=sampler(search), directions=directions(search), load_if_exists=True, **kwargs
    )
    existing = len(study.get_trials(deepcopy=False))
    study.sampler = sampler(search, search.seed + 7_919 * worker + 104_729 * existing)
    return study


def check_spec(study: optuna.Study, search: Search) -> None:
    """Refuse a study made by another spec; record this spec's fingerprint in a new one."""
    from unlearn.errors import UsageError

    key = study.user_attrs.get(SPEC_KEY)
    if key is None:
        study.set_user_attr(SPEC_KEY, search.key())
    elif key != search.key():
        raise UsageError(
            f"{search.journal} holds a study made by another spec (goal, space or base"
            " changed): give the search another name or out directory"
        )


def counted(study: optuna.Study) -> int:
    """Trials that count against the budget: ended ones (but interrupted) and running ones."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        if t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED):
            continue
        n += 1
    return n


@contextlib.contextmanager
def budget_lock(search: Search) -> Iterator[None]:
    """Held while a worker counts trials and asks for one (safe on NFS, like the journal; a
    worker killed while holding it does not keep it: `unlearn.search.lock`)."""
    with SymlinkLock(search.out / BUDGET_LOCK):
        yield


def ask(study: optuna.Study, search: Search) -> optuna.Trial | None:
    """A new trial, or None when the budget is spent."""
    with budget_lock(search):
        if counted(study) >= search.budget:
            return None
        return study.ask()


def recover(study: optuna.Study, search: Search) -> list[int]:
    """Trials left running by a killed search: failed as interrupted, their parameters queued
    again. Returns their numbers. Call only under the search lock (no live worker)."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    store = storage(search)
    study_id = store.get_study_id_from_name(search.name)
    for t in stale:
        trial_id = store.get_trial_id_from_study_id_trial_number(study_id, t.number)
        store.set_trial_user_attr(trial_id, INTERRUPTED, True)
        store.set_trial_state_values(trial_id, TrialState.FAIL)
        if t.params:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
    return [t.number for t in stale]


def reference_values(study: optuna.Study) -> dict[str, Any] | None:
    return study.user_attrs.get(REFERENCE)
