"""Printing a sweep: progress lines, the --dry-run listing, the markdown table of its points.

Every result cell goes through `unlearn.report.tables.result_cell`, the project's one rule: a
missing or failed result is a word, never a number (a failed evaluation read as chance accuracy
would look like perfect unlearning). Sweep tables show accuracies as fractions with three
decimals, the reference campaign's compact style. With several retain tasks "retain (min)" is their
minimum (`unlearn.report.analysis.retain_aggregate`), and each task has its own column.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from unlearn.report.tables import result_cell
from unlearn.sweep.spec import Sweep
from unlearn.sweep.state import FINISHED, PointState


def counter(i: int, sweep: Sweep) -> str:
    """`[3/8]`: the position of point `i` (0-based) in the sweep."""
    return f"[{i + 1}/{len(sweep.points)}]"


def count_statuses(states: Sequence[PointState]) -> str:
    """The --status summary line: `2 done, 1 failed, 5 pending` (statuses in name order)."""
    counts: dict[str, int] = {}
    for s in states:
        counts[s.status] = counts.get(s.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def _fmt(value: float | str | None) -> str:
    """An accuracy cell: 0.3125 -> "0.312"; a word ("failed") stays a word; None -> "-"."""
    return result_cell(value, fmt="{:.3f}".format)


def retain_tasks(states: Sequence[PointState]) -> list[str]:
    """The retain tasks the states hold, in suite order."""
    return list(dict.fromkeys(t for s in states for t in s.retains))


def state_line(state: PointState) -> str:
    """One progress line: `lens-rc5-rm5-3fa2c1: done forget 0.312 retain 0.881 ...`; with several
    retain tasks `retain (min) 0.881 [retain 0.950, retain_late 0.881, ...]`."""
    text = f"{state.id}: {state.status}"
    if state.status in ("done", "collapsed"):
        text += f"  forget {_fmt(state.forget)}"
        if len(state.retains) > 1:
            each = ", ".join(f"{t} {_fmt(v)}" for t, v in state.retains.items())
            text += f"  retain (min) {_fmt(state.retain)} [{each}]"
        else:
            text += f"  retain {_fmt(state.retain)}"
    if state.attack is not None and state.status == "done":
        text += f"  attack {state.attack}"
        if state.attack in FINISHED:
            text += f" (forget after {_fmt(state.attacked_forget)})"
    if state.distill is not None and state.status == "done":
        text += f"  distill {state.distill}"
    if state.robustness is not None and state.status == "done":
        text += f"  robustness {state.robustness}"
        if state.worst_case is not None:
            text += f" (worst case {_fmt(state.worst_case)})"
    if state.seconds is not None:
        text += f"  [{state.seconds:.0f} s]"
    if state.error and not state.finished:
        text += f"  ({state.error})"
    return text


def format_table(states: Sequence[PointState], jobs: dict[str, str] | None = None) -> str:
    """A markdown table of the points (what the reference campaign's result tables hold), then the
    errors. With `jobs` ({point id: "JOBID STATE"}, from unlearn.sweep.slurm) a job column is
    added."""
    with_attack = any(s.attack is not None for s in states)
    tasks = retain_tasks(states)
    each = tasks if len(tasks) > 1 else []
    header = ["point", "status", "forget acc", "retain (min)" if each else "retain acc", *each]
    if with_attack:
        header += ["attack", "forget acc after attack"]
    with_suite = any(s.robustness is not None for s in states)
    if with_suite:
        header += ["robustness", "worst case"]
    if jobs is not None:
        header.append("job")
    rows = []
    for s in states:
        row = [s.id, s.status, _fmt(s.forget), _fmt(s.retain)]
        row += [_fmt(s.retains.get(t)) for t in each]
        if with_attack:
            attack = s.attack if s.attack is not None and s.status == "done" else "-"
            # An unfinished attack shows its status word, never a number from a partial curve.
            after = _fmt(s.attacked_forget) if attack in FINISHED else attack
            row += [attack, after]
        if with_suite:
            suite = s.robustness if s.robustness is not None and s.status == "done" else "-"
            row += [suite, _fmt(s.worst_case) if suite in FINISHED else suite]
        if jobs is not None:
            row.append(jobs.get(s.id, "-"))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in [header, *rows]
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    errors = [f"  {s.id}: {s.error}" for s in states if s.error and not s.finished]
    if errors:
        lines += ["", "errors:", *errors]
    return "\n".join(lines)


def describe_points(sweep: Sweep) -> str:
    """The --dry-run listing: every point's id, method and varied values."""
    runs = [p for p in sweep.points if p.baseline is None]
    methods = sorted({p.method for p in runs})
    baselines = len(sweep.points) - len(runs)
    extra = f" + {baselines} baseline(s)" if baselines else ""
    lines = [
        f"sweep {sweep.name}: {len(runs)} point(s){extra}, method(s) {', '.join(methods)}",
        f"run dirs under {sweep.out}, store {sweep.store}",
    ]
    width = max(len(p.id) for p in sweep.points)
    for p in sweep.points:
        values = " ".join(f"{k}={show_value(v)}" for k, v in p.varied.items()) or "(base config)"
        if p.baseline is not None:
            b = p.baseline.model_args
            values = f"baseline {p.baseline.label!r}: {b.model}" + (
                f" @ {b.revision}" if b.revision else ""
            )
        attack = "  + attack" if p.attack_config is not None else ""
        if p.robustness is not None:
            attack += f"  + robustness {p.robustness.inputs.suite.name}"
        lines.append(f"  {p.id:<{width}}  {values}{attack}")
    return "\n".join(lines)


def show_value(value: Any) -> str:
    """A varied value as the spec would write it: `[5, 10]`, `true`, `null`, `0.001`."""
    return json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
