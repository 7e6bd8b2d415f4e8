"""`unlearn search SPEC.yaml`: an Optuna search over run fields for the forget/retain boundary or
the Pareto front (forget, retain, optionally the robustness worst case).

    unlearn search searches/rmu-boundary.yaml               # run or continue the study
    unlearn search searches/rmu-boundary.yaml --dry-run     # validate, show the space
    unlearn search searches/rmu-boundary.yaml --status      # the trials so far
    unlearn search searches/rmu-boundary.yaml --workers 2   # two local processes, one study
    unlearn search searches/rmu-boundary.yaml --executor slurm --workers 8

The spec format is in docs/search.md. Results: OUT/search.md (the boundary table in the reference
campaign's format, or the front), OUT/pareto.png, OUT/best.yaml (`unlearn run --config best.yaml`),
every trial a run directory under OUT/trials indexed in the store. Exit code 0 when the budget is
spent, 1 when no trial satisfies the constraint while lowering forget below the target's, or the
reference has no result, 2 on a bad spec or out, 75 when a stop signal ended the search (rerun the
same command to continue). Trials are chosen on one part of each task's questions and the chosen
ones reported on the other (docs/search.md).
"""

from __future__ import annotations

import sys

from unlearn.commands.arguments import ArgumentParser, add_executor_arguments
from unlearn.tracking import TrackingArgs, for_many
from unlearn.training.preemption import EXIT_PREEMPTED


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn search", description=__doc__)
    parser.add_argument("spec", metavar="SPEC", help="the search spec (YAML)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", "--dry_run", action="store_true", help="validate the spec, show the space"
    )
    mode.add_argument("--status", action="store_true", help="print the trials so far and exit")
    add_executor_arguments(
        parser,
        "trials",
        "trials run at once: local processes (the cores split) or submitit jobs, all sharing"
        " the study",
    )
    parser.add_arguments(TrackingArgs, dest="tracking")
    ns = parser.parse_args(argv)
    if ns.workers < 1:
        parser.error(f"--workers must be >= 1, got {ns.workers}")

    from unlearn.search.driver import ReferenceFailed, SearchStopped, run_search
    from unlearn.search.outputs import best_line, collect, render, status_line
    from unlearn.search.spec import describe, load_search
    from unlearn.search.study import open_study
    from unlearn.sweep.points import track

    search = load_search(ns.spec, check_hub=not (ns.dry_run or ns.status))
    # Every trial's runs and the baselines, in one group of the project (docs/tracking.md).
    search.tracking = for_many(ns.tracking, search.name, "search")
    for point in search.baselines if search.tracking is not None else ():
        track(point, search.tracking)
    if ns.dry_run:
        print(describe(search))
        return 0
    if ns.status:
        result = collect(search, open_study(search, create=False))
        print(render(search, result), end="")
        return 0
    try:
        result = run_search(search, ns.workers, ns.executor)
    except SearchStopped as e:
        print(f"search {search.name}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except ReferenceFailed as e:
        print(f"search {search.name}: {e}", file=sys.stderr)
        return 1
    print()
    print(status_line(result, search.budget))
    print(best_line(search, result))
    print(f"tables: {search.out / 'search.md'}")
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
