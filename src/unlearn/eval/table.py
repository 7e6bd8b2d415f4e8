"""Markdown tables of evaluation results: defined once, in `unlearn.report.tables` (the one
result-cell rule); these names stay importable from here for the commands that use them."""

from unlearn.report.tables import TASK_HEADERS, pct, results_table

__all__ = ["TASK_HEADERS", "pct", "results_table"]
