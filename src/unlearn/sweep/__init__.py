"""Sweeps: one YAML spec -> a grid of unlearning runs -> their evaluations -> optional attacks.

    sweep = load_sweep("ct.yaml")      # parse + validate everything; nothing is written
    states = run_sweep(sweep)          # run (or resume) every point with the local executor
    print(format_table(states))

The spec format is documented in docs/sweeps.md. The modules, each importing only ones listed
above it (no cycle):

points.py   one combination of values -> a validated `Point` (run + attack config), point ids
spec.py     YAML -> a validated `Sweep`: keys, blocks, value types, grid expansion and the point
            cap, the `slurm:` block (`SlurmSettings`)
state.py    `PointState`: what a point's run directories say (`inspect_point`, reads only)
table.py    progress lines, the --dry-run listing, the markdown table (the one result-cell rule)
execute.py  `run_point`, the local executor, the sweep lock, stop signals, `run_sweep`
slurm.py    the submitit executor (SLURM / submitit-local), job records, --status job states;
            not imported here (submitit itself is imported only when a job is submitted)
"""

from unlearn.sweep.execute import (
    Executor,
    LocalExecutor,
    SweepPreempted,
    run_point,
    run_sweep,
)
from unlearn.sweep.points import Point, point_id
from unlearn.sweep.spec import MAX_POINTS, SlurmSettings, Sweep, load_sweep
from unlearn.sweep.state import FINISHED, PointState, inspect_point
from unlearn.sweep.table import describe_points, format_table

__all__ = [
    "FINISHED",
    "MAX_POINTS",
    "Executor",
    "LocalExecutor",
    "Point",
    "PointState",
    "SlurmSettings",
    "Sweep",
    "SweepPreempted",
    "describe_points",
    "format_table",
    "inspect_point",
    "load_sweep",
    "point_id",
    "run_point",
    "run_sweep",
]
