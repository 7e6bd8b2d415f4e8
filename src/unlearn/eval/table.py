"""Markdown tables of evaluation results in the seeds' style (percentages, 2 decimals)."""

from __future__ import annotations

from collections.abc import Mapping

TASK_HEADERS = {
    "forget": "forget acc (↓)",
    "forget_heldout": "forget heldout acc (↓)",
    "forget_attack": "forget attack acc",
    "retain": "retain acc (↑)",
}


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def results_table(rows: Mapping[str, Mapping[str, Mapping]], tasks: list[str]) -> str:
    """Rows: {model label: {task: metrics}} -> `| Model | forget acc (↓) | ... |` markdown."""
    headers = ["Model", *(TASK_HEADERS.get(t, f"{t} acc") for t in tasks)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for label, results in rows.items():
        cells = [label]
        for t in tasks:
            r = results.get(t)
            if r and r.get("status") == "failed":  # a failed eval is shown as failed, not a number
                cells.append("failed")
                continue
            cell = pct(r.get("acc")) if r else "-"
            if r and r.get("collapse", {}).get("collapsed"):
                cell += " (collapsed)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
