"""What a search costs besides its runs: Optuna's sampler and journal storage, per trial, as the
study grows.

    .venv/bin/python bench/search_overhead.py [--trials 200] [--params 3] [--trial_s 100]

One process plays a search's worker loop on a fresh journal file (the storage `unlearn search`
uses, with its symlink lock) with instant stand-in trials: the budget count and `ask` under the
budget lock, the sampling of `--params` floats (multivariate TPE, constrained), the user
attributes and constraint a trial records, and `tell`. It prints the time of that loop at
trial 10, 40 (the issue's budget), 100, ... (the mean of the 10 trials before) and the share
of a `--trial_s` second trial it would be. Real searches record the same overhead per trial in
OUT/timing.jsonl (search.md shows the total), measured around their real runs.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--params", type=int, default=3)
    parser.add_argument("--trial_s", type=float, default=100.0, help="a typical trial's time")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "study.journal")
        storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileSymlinkLock(path)))
        sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=10, multivariate=True)
        study = optuna.create_study(storage=storage, sampler=sampler, study_name="bench")
        budget_lock = JournalFileSymlinkLock(str(Path(tmp) / ".budget"))
        rng = random.Random(0)
        marks = {10, 40, 100, 200, 500, 1000}
        times: list[float] = []
        share = f"share of a {args.trial_s:g} s trial"
        print(f"| trials in the study | overhead per trial (ms) | {share} |")
        print("|---|---|---|")
        for n in range(1, args.trials + 1):
            start = time.perf_counter()
            budget_lock.acquire()
            try:
                len(study.get_trials(deepcopy=False))  # the budget count
                trial = study.ask()
            finally:
                budget_lock.release()
            values = [
                trial.suggest_float(f"p{i}", 1e-4, 1e-1, log=True) for i in range(args.params)
            ]
            forget = sum(math.log10(v) for v in values) / -10 + rng.gauss(0, 0.02)
            margin = rng.gauss(0, 0.02)
            for key, value in (("run_id", f"r{n}"), ("forget", forget), ("margin", margin)):
                trial.set_user_attr(key, value)
            trial.set_constraint("retain_shortfall", -margin)
            study.tell(trial, forget)
            times.append(time.perf_counter() - start)
            if n in marks:
                took = sum(times[-10:]) / len(times[-10:])  # the last 10 trials' mean
                print(f"| {n} | {1000 * took:.1f} | {100 * took / args.trial_s:.3f}% |")


if __name__ == "__main__":
    main()
