"""Experiment tracking with the libraries users already run: `--report_to wandb|tensorboard`
(docs/tracking.md). The run directory stays the source of truth; trackers get a copy.

base.py                 TrackingArgs (the flags), RunInfo, the Tracker interface, grouping
wandb_tracker.py        Weights & Biases (optional: pip install unlearn[wandb])
tensorboard_tracker.py  TensorBoard event files (optional: pip install unlearn[tensorboard])
reporter.py             Reporter: what a run reports through (names, fan-out to the backends)
"""

from unlearn.tracking.base import (
    TRACKING_FIELDS,
    RunInfo,
    Tracker,
    TrackingArgs,
    for_group,
    for_many,
)
from unlearn.tracking.reporter import Reporter

__all__ = [
    "TRACKING_FIELDS",
    "Reporter",
    "RunInfo",
    "Tracker",
    "TrackingArgs",
    "for_group",
    "for_many",
]
