"""Markdown tables and PNG plots from a results store, in the style of the tables users keep.

tables.py    markdown tables and the one result-cell rule ("a missing or failed result is a
             word, never a number"), used by every table in the project
analysis.py  pure numbers: tamper summary, middle step, Pareto front, the retain aggregate
             (the minimum over the retain tasks)
plots.py     matplotlib only, from plain numbers
data.py      the store as a report reads it: runs, final results, task roles, result cells
render.py    writes report.md and its PNGs (`render_report`); a terminal summary of a
             campaign (`summary`)
"""

from unlearn.report.analysis import (
    TamperSummary,
    middle_step,
    pareto_front,
    retain_aggregate,
    tamper_summary,
)
from unlearn.report.render import SCATTER_PNG, TAMPER_PNG, render_report, summary
from unlearn.report.tables import markdown_table, pct, result_cell, split_config_keys

__all__ = [
    "SCATTER_PNG",
    "TAMPER_PNG",
    "TamperSummary",
    "markdown_table",
    "middle_step",
    "pareto_front",
    "pct",
    "render_report",
    "result_cell",
    "retain_aggregate",
    "split_config_keys",
    "summary",
    "tamper_summary",
]
