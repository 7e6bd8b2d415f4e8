"""Markdown tables and PNG plots from a results store, in the style of the tables users keep.

tables.py    markdown tables and the one result-cell rule ("a missing or failed result is a
             word, never a number"), used by every table in the project
analysis.py  pure numbers: tamper summary, middle step, Pareto front
plots.py     matplotlib only, from plain numbers
render.py    loads the store, writes report.md and its PNGs (`render_report`); a terminal
             summary of a campaign (`summary`)
"""

from unlearn.report.analysis import TamperSummary, middle_step, pareto_front, tamper_summary
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
    "split_config_keys",
    "summary",
    "tamper_summary",
]
