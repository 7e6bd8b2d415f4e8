"""`unlearn sweep SPEC.yaml`: a grid of unlearning runs, each evaluated, optionally attacked.

    unlearn sweep sweeps/ct.yaml             # run every point not finished yet (resumes)
    unlearn sweep sweeps/ct.yaml --dry-run   # validate the spec and list the points
    unlearn sweep sweeps/ct.yaml --status    # each point's status, read from its run directory
    unlearn sweep sweeps/ct.yaml --executor slurm   # one SLURM job per point (submitit)

The spec format is in docs/sweeps.md. The whole spec is validated before anything runs. Exit
code 0 when every point has a result (done, collapsed and diverged are results), 1 when some
point failed (re-run the same command to retry it), 2 on a bad spec, 75 when SIGTERM (or
SIGUSR1/2) stopped the sweep after the point in progress (re-run the same command to resume).
"""

from __future__ import annotations

import sys

from unlearn.commands.arguments import ArgumentParser, add_executor_arguments
from unlearn.sweep.execute import SweepPreempted, run_sweep
from unlearn.sweep.points import track
from unlearn.sweep.slurm import make_executor, states_with_jobs
from unlearn.sweep.spec import check_out, input_models, load_sweep
from unlearn.sweep.state import inspect_point
from unlearn.sweep.table import count_statuses, describe_points, format_table
from unlearn.tracking import TrackingArgs, for_many
from unlearn.training.preemption import EXIT_PREEMPTED
from unlearn.world import load_world


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn sweep", description=__doc__)
    parser.add_argument("spec", metavar="SPEC", help="the sweep spec (YAML)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", "--dry_run", action="store_true", help="list the points and exit"
    )
    mode.add_argument(
        "--status", action="store_true", help="print each point's status from its run directory"
    )
    add_executor_arguments(
        parser,
        "points",
        "local executor: run this many points at once, each in its own process, the CPU cores"
        " split between them (docs/sweeps.md)",
    )
    parser.add_argument(
        "--max_points",
        "--max-points",
        type=int,
        default=1000,  # unlearn.sweep.spec.MAX_POINTS (not imported here: it imports torch)
        help="refuse a spec that expands to more points than this: a grid with one list too"
        " many is refused before its points are built (docs/sweeps.md)",
    )
    parser.add_arguments(TrackingArgs, dest="tracking")
    ns = parser.parse_args(argv)

    if ns.workers < 1:  # before the spec is read: nothing runs, nothing is written
        parser.error(f"--workers must be >= 1, got {ns.workers}")
    # Listing or reading statuses needs nothing from the hub: a dry run works offline.
    sweep = load_sweep(ns.spec, ns.max_points, check_hub=not (ns.dry_run or ns.status))
    # Every run of every point, in one group of the project (docs/tracking.md).
    tracking = for_many(ns.tracking, sweep.name, "sweep")
    for point in sweep.points if tracking is not None else ():
        track(point, tracking)
    if ns.dry_run:
        print(describe_points(sweep))
        return 0
    if ns.status:
        states, jobs = states_with_jobs(sweep, [inspect_point(p) for p in sweep.points])
        print(format_table(states, jobs))
        print(count_statuses(states))
        return 0
    # OUT must be new, empty or this sweep's own (the demo's sweep shares its runs folder with
    # the demo's baselines: it calls load_sweep itself, without this check).
    world = load_world(sweep.world) if sweep.world else None
    check_out(sweep.out, "sweep", input_models(sweep.points, world))
    try:
        states = run_sweep(sweep, make_executor(ns.executor, sweep, workers=ns.workers))
    except SweepPreempted as e:
        print()
        print(format_table(e.states))
        print(f"sweep {sweep.name}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    print()
    print(format_table(states))
    return 0 if all(s.finished for s in states) else 1


if __name__ == "__main__":
    sys.exit(main())
