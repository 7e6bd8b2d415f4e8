"""`unlearn report`: markdown tables and plots from a results store.

    unlearn report --store results.db --out report/
    unlearn report --store results.db --ingest runs/ --out report/   # index run dirs first

Writes OUT/report.md with forget_vs_retain.png and tamper_curves.png beside it and prints the
path of report.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unlearn.commands.arguments import ArgumentParser
from unlearn.errors import UsageError
from unlearn.fsutil import check_writable_parent
from unlearn.report import render_report
from unlearn.runs.store import Store, check_store, read_tree


@dataclass
class ReportConfig:
    """Options of `unlearn report`."""

    store: str | None = None
    """The SQLite results store to read."""
    out: str | None = None
    """Directory for report.md and its plots."""
    ingest: str | None = None
    """A directory of run directories to ingest before rendering (creates the store if needed:
    the store is an index that can always be rebuilt from the run directories)."""

    def __post_init__(self) -> None:
        if self.store is None:
            raise UsageError("--store is required")
        if self.out is None:
            raise UsageError("--out is required")
        if self.ingest is None and not Path(self.store).is_file():
            raise UsageError(f"results store {self.store} does not exist")
        if self.ingest is not None and not Path(self.ingest).is_dir():
            raise UsageError(f"--ingest {self.ingest} is not a directory")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn report", description=__doc__)
    parser.add_arguments(ReportConfig, dest="cfg")
    cfg: ReportConfig = parser.parse_args(argv).cfg

    # Everything is checked before anything is written: a bad store or a bad run directory
    # leaves neither an empty report directory nor a new, empty store behind.
    out = check_writable_parent(Path(cfg.out) / "report.md").parent
    check_store(cfg.store)
    records = read_tree(cfg.ingest) if cfg.ingest is not None else []
    with Store(cfg.store) as store:
        store.ingest_records(records)
        path = render_report(store, out)
    print(path)
    return 0
