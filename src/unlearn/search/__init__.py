"""Searches: Optuna over run fields, for the forget/retain boundary or the Pareto front.

    search = load_search("rmu.yaml")      # parse + validate everything; nothing is written
    result = run_search(search)           # run or continue the study to its budget

The spec format is in docs/search.md. The modules, each importing only ones listed above it:

space.py    the `space:` block -> `Param`s (Optuna distributions), checked against run fields
spec.py     YAML -> a validated `Search` (blocks, goal, budget, baselines, robustness plan)
lock.py     the budget lock: a symlink lock (NFS) that a killed holder cannot keep
study.py    the Optuna study: journal storage, sampler, pruner, constraint, budget, recovery
trial.py    one trial: sample, run it as a sweep point, tell the study (pruning, multi-fidelity)
outputs.py  rows, front, best trial, search.md and best.yaml (plot.py draws pareto.png)
driver.py   `run_search`: the lock, the reference, the workers (local processes or submitit)
"""

from unlearn.search.driver import run_search
from unlearn.search.spec import Search, load_search

__all__ = ["Search", "load_search", "run_search"]
