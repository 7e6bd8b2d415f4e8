"""Markdown tables and the one result-cell rule every table in the project follows.

The rule: **a missing or failed result is a word, never a number.** A failed evaluation read as
chance accuracy looks like perfect unlearning, so `result_cell` is the only place that turns a
result into a table cell:

- a run that did not finish shows its status word (pending, running, failed, diverged, ...);
- a failed evaluation shows "eval failed" (or the caller's shorter word, e.g. "failed");
- a result never measured shows "-";
- a non-finite value shows the failed word too (the harness treats NaN as a failed eval);
- anything else is a number, as a percentage by default (`pct`); a perplexity task's `ppl` as
  a plain number with two decimals (`ppl_text`: "3.42"), its header saying lower is better.

This module imports nothing heavy (no store, no evaluator, no matplotlib): light commands
(`unlearn world`, `unlearn report`) print tables without loading torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

from unlearn.runs.rows import EvalRow

MISSING = "-"
"""A result never measured."""
EVAL_FAILED = "eval failed"
"""A result whose evaluation failed (the report's word; compact tables pass "failed")."""
TASK_HEADERS = {
    "forget": "forget acc (↓)",
    "forget_heldout": "forget heldout acc (↓)",
    "forget_attack": "forget attack acc",
    "retain": "retain acc (↑)",
    "retain_late": "retain late acc (↑)",
    "near_domain": "near domain acc (↑)",
    "general_ppl": "general ppl (↓)",
}
"""The world tasks' headers (their roles are fixed)."""
PPL = "ppl"
"""The metric of a perplexity task (lower is better; a number, not a percentage)."""
RETAIN_MIN_HEADER = "retain min (↑)"
TIME_HEADER = "time"
"""An unlearning run's wall time (`RunMeta.wall_seconds`)."""
"""The column of the retain aggregate (`analysis.retain_aggregate`) beside several retain
tasks."""
TASK_TITLES = {
    "wmdp_bio_robust": "WMDP Bio Robust", "wmdp_bio": "WMDP Bio",
    "wmdp_bio_cloze": "WMDP Bio Cloze", "wmdp_chem": "WMDP Chem", "wmdp_cyber": "WMDP Cyber",
    "mmlu": "MMLU", "mmlu_stem": "MMLU STEM",
}  # fmt: skip
"""Benchmarks' names as papers and the reference campaign's tables write them; other tasks are
title-cased from their names, with these words in capitals:"""
ACRONYMS = frozenset({"mmlu", "wmdp", "stem", "mcqa", "bbh", "gsm8k", "arc", "qa"})
ARROWS = {"forget": " (↓)", "retain": " (↑)"}
"""A task's role in its suite (unlearn.eval.suite) says which way is better."""
PREFERRED_ORDER = (
    "retain_coef", "remove_coef", "lr", "muon_lr", "adam_lr", "num_train_examples", "epochs",
    "steps", "batch_size", "lora_r", "optimizer", "retain_loss", "layers",
)  # fmt: skip
"""Hyperparameter columns in this order, then the rest alphabetically."""
BOOKKEEPING_KEYS = frozenset(
    {"name", "role", "output", "output_dir", "out", "out_dir", "run_dir",
     "forget_tasks", "retain_tasks", "other_tasks", "task_dirs"}
)  # fmt: skip
"""Config keys that name or place a run rather than configure it: never a table column."""

Result = EvalRow | Mapping[str, Any] | float | str | None
"""What a result cell can be made from: a stored eval row, an evaluator's result dict
({"acc": ..., "status": "failed", ...}), a bare value, a word already decided, or nothing."""


# -- the result-cell rule ----------------------------------------------------------------------


def pct(value: float | None) -> str:
    """0.30125 -> "30.12%" (the reference campaign's tables: percentages, 2 decimals); None ->
    "-"."""
    return MISSING if value is None else f"{100 * value:.2f}%"


def ppl_text(value: float | None) -> str:
    """A perplexity: 3.4187 -> "3.42"; None -> "-"."""
    return MISSING if value is None else f"{value:.2f}"


def is_ppl_result(result: Mapping[str, Any]) -> bool:
    """Whether an evaluator's result dict (or a task's {metric: row}) is a perplexity: it has a
    ppl and no accuracy."""
    return PPL in result and "acc" not in result


def result_cell(
    result: Result,
    *,
    run_status: str = "done",
    metric: str = "acc",
    failed: str = EVAL_FAILED,
    fmt: Callable[[float], str] = pct,
) -> str:
    """The table cell of one result: `fmt(value)` for a finished measurement, else a word.

    `run_status` is the status of the run the result belongs to: any status but "done" is shown
    instead of the result (an unfinished run has no trustworthy number even when it has an eval
    row). `metric` picks the value out of a result dict; `failed` is the word for a failed eval.
    """
    if run_status != "done":
        return run_status
    if isinstance(result, str):
        return result
    if isinstance(result, EvalRow):
        if result.status == "failed":
            return failed
        value = result.value
    elif isinstance(result, Mapping):
        if result.get("status") == "failed":
            return failed
        value = result.get(metric)
    elif result is None or (isinstance(result, Real) and not isinstance(result, bool)):
        value = result
    else:
        raise TypeError(f"not a result: {result!r}")
    if value is None:
        return MISSING
    # A stored row's value is finite (rundir checks it); a raw value or dict might not be.
    return fmt(value) if math.isfinite(value) else failed


# -- markdown ----------------------------------------------------------------------------------


def _escape(text: str) -> str:
    """Make text safe inside a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def task_title(task: str) -> str:
    """`wmdp_bio_robust` -> "WMDP Bio Robust"; `my_local_qs` -> "My Local Qs"."""
    if task in TASK_TITLES:
        return TASK_TITLES[task]
    words = task.replace("-", "_").split("_")
    return " ".join(w.upper() if w.lower() in ACRONYMS else w.capitalize() for w in words if w)


def task_header(task: str, role: str | None = None, ppl: bool = False) -> str:
    """A task's column header: a world task's own, else its title and the role's arrow
    (`WMDP Bio Robust (↓)`, `MMLU (↑)`); a perplexity task (`ppl`) `Wikitext ppl (↓)`, whatever
    its role (it is reported only)."""
    if task in TASK_HEADERS:
        return TASK_HEADERS[task]
    if ppl:
        return f"{task_title(task)} ppl (↓)"
    return task_title(task) + ARROWS.get(role or "", "")


def retain_min_label(tasks: Sequence[str]) -> str:
    """What the retain aggregate is, for a plot axis: "min over retain tasks: a, b, c"."""
    return f"min over retain tasks: {', '.join(tasks)}"


def results_table(
    rows: Mapping[str, Mapping[str, Mapping]],
    tasks: list[str],
    roles: Mapping[str, str] | None = None,
) -> str:
    """Rows: {model label: {task: result dict}} -> `| Model | forget acc (↓) | ... |` markdown
    (`roles`: task -> forget/retain/other, for the arrows). A collapsed model's number carries
    "(collapsed)"; a perplexity task (a result with ppl and no acc) shows its ppl as a number."""
    ppl = {t for t in tasks if any(is_ppl_result(r.get(t) or {}) for r in rows.values())}
    headers = ["Model", *(task_header(t, (roles or {}).get(t), t in ppl) for t in tasks)]
    body = []
    for label, results in rows.items():
        cells = [label]
        for t in tasks:
            r = results.get(t) or {}
            if t in ppl:
                cell = result_cell(r, metric=PPL, failed="failed", fmt=ppl_text)
            else:
                cell = result_cell(r, failed="failed")
            if r.get("status") != "failed" and r.get("collapse", {}).get("collapsed"):
                cell += " (collapsed)"
            cells.append(cell)
        body.append(cells)
    return markdown_table(headers, body)


# -- other cells -------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A config value for a table cell: 0.001 -> "0.001", 5.0 -> "5", [5, 10] -> "[5, 10]"."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def format_seconds(seconds: float | None) -> str:
    """A run's wall time for a table cell: "95 s", "6.4 min"; "-" when it has none."""
    if seconds is None:
        return MISSING
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_loss(value: float | None) -> str:
    """A final loss term; None is how a run directory keeps a non-finite one."""
    return "nan/inf" if value is None else f"{value:.4g}"


# -- hyperparameter columns --------------------------------------------------------------------


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 16}} -> {"lora.r": 16}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _key_order(key: str) -> tuple[int, str]:
    # A nested key matches by its last part ("train.lr" is "lr") or joined ("lora.r" is "lora_r").
    names = [n for n in (_leaf(key), key.replace(".", "_")) if n in PREFERRED_ORDER]
    return (PREFERRED_ORDER.index(names[0]) if names else len(PREFERRED_ORDER)), key


def split_config_keys(configs: Sequence[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """(keys whose value differs among the configs, in column order; {key: value} of the rest).

    A key missing from some configs counts as varying. Bookkeeping keys are dropped.
    """
    flat = [flatten(c) for c in configs]
    # The suite's roles (run.json "suite") name the columns; they are not a setting.
    keys = {
        k
        for f in flat
        for k in f
        if _leaf(k) not in BOOKKEEPING_KEYS and not k.startswith("suite.")
    }
    varying, fixed = [], {}
    for key in keys:
        seen = {json.dumps(f.get(key, "<missing>"), sort_keys=True) for f in flat}
        if len(seen) > 1:
            varying.append(key)
        else:
            fixed[key] = flat[0][key]
    return sorted(varying, key=_key_order), {k: fixed[k] for k in sorted(fixed, key=_key_order)}


def column_headers(keys: list[str]) -> list[str]:
    """Column titles: the last part of a nested key, unless two columns would share it."""
    leaves = [_leaf(k) for k in keys]
    return [
        leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(keys, leaves, strict=True)
    ]
