"""Argument parsing shared by every subcommand.

Every parse error becomes a `UsageError`, so the CLI reports it as one line on stderr with exit
code 2 (argparse's default prints the whole usage block first).
"""

from __future__ import annotations

import argparse
from typing import NoReturn

import simple_parsing

from unlearn.errors import UsageError


class ArgumentParser(simple_parsing.ArgumentParser):
    """simple-parsing parser: dataclass fields become flags (`--retain_coef` and `--retain-coef`
    both work, since users know the underscore names), field docstrings become --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault(
            "add_option_string_dash_variants", simple_parsing.DashVariant.UNDERSCORE_AND_DASH
        )
        kwargs.setdefault("formatter_class", simple_parsing.SimpleHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


EXECUTORS = ("local", "slurm", "submitit-local")


def add_executor_arguments(parser: argparse.ArgumentParser, what: str, workers_help: str) -> None:
    """`--executor` and `--workers` of the commands that run many jobs (sweep, search); `what`
    names the jobs ("points", "trials")."""
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help=f"where {what} run: in this process, as SLURM jobs (submitit, resources from the"
        " spec's slurm: block), or submitit's local executor (docs/resume-and-slurm.md)",
    )
    parser.add_argument("--workers", type=int, default=1, help=workers_help)
