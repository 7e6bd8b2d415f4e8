"""Exceptions with a meaning for the command line.

`UsageError` is bad input: the CLI prints its message as one line on stderr and exits 2, with no
traceback. Raise it before any weights load. The training guards raise the other two; the
trainer records them as run statuses instead of crashing a sweep.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input (config value, unknown name, missing file). Exit code 2, one line."""


class DivergedError(RuntimeError):
    """A loss term went non-finite or exploded; the run is marked `diverged`, nothing is saved."""


class RetainZeroError(RuntimeError):
    """retain_coef > 0 but the retain term stayed exactly 0: the reference equals the model."""
