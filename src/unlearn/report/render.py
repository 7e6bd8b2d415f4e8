"""The report: load a results store, write `report.md` with its tables and the PNGs beside it.

`render_report(store, out_dir)` writes `report.md` and, beside it, `forget_vs_retain.png` and
`tamper_curves.png` (when there is something to plot).

Design choices:
- Every result cell goes through `tables.result_cell`: a number only for a finished run with a
  finished eval; a pending, running, failed, diverged or collapsed run shows its status word, a
  failed eval "eval failed", a task never measured "-".
- Accuracy is the "acc" metric; the latest evaluated step of each task is the final result.
- One table per method: the baselines first, then one row per unlearn run with only the
  hyperparameters that vary among that method's runs (the fixed ones are listed above it), the
  final value of each loss term, accuracies and status.
- Baseline runs are named by their config "name" and ordered by their config "role" (target,
  checkpoint, ignorant, filtered); the original model of the tamper comparison is the baseline
  whose role is "target" (else the first baseline).
- Task columns come from the evaluation suites the runs recorded (run.json "suite": forget,
  retain and other tasks): forget tasks first with (↓), then retain tasks with (↑), then the
  others, each named as papers name the benchmark (`WMDP Bio Robust (↓) | MMLU (↑)`). The
  tamper table follows the world's held-out forget facts when measured, else the suite's first
  forget task, and reports the other forget and retain tasks at the end of the attack.
- The numbers come from pure functions (analysis.py) and the pictures from plots.py, which gets
  plain numbers: this module is the only one that reads the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn.fsutil import atomic_write_text
from unlearn.report.analysis import middle_step, tamper_summary
from unlearn.report.plots import BaselinePoint, plot_forget_vs_retain, plot_tamper_curves
from unlearn.report.tables import (
    EVAL_FAILED,
    MISSING,
    TASK_HEADERS,
    column_headers,
    flatten,
    format_loss,
    format_value,
    markdown_table,
    pct,
    result_cell,
    split_config_keys,
    task_header,
)
from unlearn.runs.rows import STATUSES, EvalRow
from unlearn.runs.store import Store, StoredRun

ACC = "acc"
BASELINE_ROLES = ("target", "checkpoint", "ignorant", "filtered")
"""Baseline rows come in this order of their config "role" (others after them)."""
WORLD_SUITE = {"forget": ["forget", "forget_heldout"], "retain": ["retain"], "other": []}
"""The roles of the world's tasks, for runs that recorded no suite (older run directories)."""
ROLE_ORDER = ("forget", "retain", "other")
NOT_LOSS_TERMS = frozenset({"lr", "grad_norm"})
"""Training-state values some runs keep beside their loss terms; not loss columns."""
SCATTER_PNG, TAMPER_PNG = "forget_vs_retain.png", "tamper_curves.png"
NOTE_CHARS = 80


# -- the data a report needs -------------------------------------------------------------------


@dataclass
class _Data:
    baselines: list[StoredRun]
    unlearn: list[StoredRun]
    attacks: list[StoredRun]
    final: dict[str, dict[str, dict[str, EvalRow]]]
    """run id -> task -> metric -> latest row."""
    roles: dict[str, str]
    """task -> forget, retain or other, from the suites the runs recorded, in suite order."""

    @classmethod
    def load(cls, store: Store) -> _Data:
        runs = store.runs()
        baselines = [r for r in runs if r.kind == "baseline"]
        roles: dict[str, str] = {}
        for r in runs:
            suite = r.config.get("suite") if isinstance(r.config.get("suite"), dict) else None
            for role in ROLE_ORDER:
                for task in (suite or WORLD_SUITE).get(role) or []:
                    roles.setdefault(task, role)
        by_id = {r.id: r for r in runs}

        def attack_order(attack: StoredRun) -> tuple:
            # Attacks on baselines first (in role order), then on unlearned runs by method and
            # id: parallel workers finish in any order, the table should not change with it.
            parent = by_id.get(attack.parent or "")
            if parent is not None and parent.kind == "baseline":
                return (0, _role_rank(parent.config.get("role")), parent.id)
            return (1, (parent.method or "") if parent else "", attack.parent or "", attack.id)

        return cls(
            baselines=sorted(baselines, key=lambda b: _role_rank(b.config.get("role"))),
            unlearn=[r for r in runs if r.kind == "unlearn"],
            attacks=sorted((r for r in runs if r.kind == "attack"), key=attack_order),
            final={r.id: store.final_evals(r.id) for r in runs},
            roles=roles,
        )

    def tasks(self, runs: Sequence[StoredRun]) -> list[str]:
        measured = {t for r in runs for t, m in self.final[r.id].items() if ACC in m}
        return ordered_tasks(measured, self.roles)

    def header(self, task: str) -> str:
        return task_header(task, self.roles.get(task))

    def first(self, role: str) -> str | None:
        """The suite's first task of a role (the world's `forget` / `retain`)."""
        return next((t for t, r in self.roles.items() if r == role), None)

    def target(self) -> StoredRun | None:
        roles = [b for b in self.baselines if b.config.get("role") == "target"]
        return (roles or self.baselines or [None])[0]

    def done_acc(self, run: StoredRun, task: str) -> float | None:
        """A finished run's accuracy on a task, or None when there is no trustworthy number."""
        row = self.final[run.id].get(task, {}).get(ACC)
        ok = run.status == "done" and row is not None and row.status == "done"
        return row.value if ok else None


def _role_rank(role: Any) -> int:
    return BASELINE_ROLES.index(role) if role in BASELINE_ROLES else len(BASELINE_ROLES)


def ordered_tasks(tasks: set[str], roles: dict[str, str] | None = None) -> list[str]:
    """Forget tasks, then retain, then the others, each in suite order; unknown ones last."""
    roles = roles or {}
    known = [t for role in ROLE_ORDER for t, r in roles.items() if r == role and t in tasks]
    return known + sorted(tasks - set(known))


def baseline_name(run: StoredRun) -> str:
    return str(run.config.get("name") or run.id)


def _attacked_label(attack: StoredRun, by_id: dict[str, StoredRun]) -> str:
    parent = by_id.get(attack.parent or "")
    if parent is None:
        return Path(attack.parent).name if attack.parent else "?"
    if parent.kind == "baseline":
        return baseline_name(parent)
    return f"{parent.id} ({parent.method})" if parent.method else parent.id


def _primary_task(data: _Data) -> str | None:
    """The forget task whose curve the tamper table follows: the world's held-out facts when
    measured (recovery there is latent knowledge, not re-learning), else the first forget task
    of the suite that the attacks measured."""
    tasks = {t for a in data.attacks for t in data.final[a.id]}
    forget = [t for t, r in data.roles.items() if r == "forget"]
    return next((t for t in ["forget_heldout", *forget] if t in tasks), None)


# -- cells -------------------------------------------------------------------------------------


def acc_cell(run: StoredRun, final: dict[str, dict[str, EvalRow]], task: str) -> str:
    """The accuracy cell of one run and task: a percentage, or the word saying why not."""
    return result_cell(final.get(task, {}).get(ACC), run_status=run.status)


def _loss_cell(run: StoredRun, term: str) -> str:
    # A run that did not finish has no trustworthy final losses either: show its status.
    if run.status != "done":
        return run.status
    return format_loss(run.final[term]) if term in run.final else MISSING


def _loss_header(term: str) -> str:
    return term if term.endswith("loss") else f"{term} loss"


def _note(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= NOTE_CHARS else text[: NOTE_CHARS - 1] + "…"


def _eval_note(final: dict[str, dict[str, EvalRow]]) -> str:
    failed = [
        f"{t}: {r.error}" for t, m in final.items() for r in m.values() if r.status == "failed"
    ]
    return failed[0] if failed else ""


def _run_note(run: StoredRun, final: dict[str, dict[str, EvalRow]]) -> str:
    return _note(run.error or _eval_note(final))


# -- markdown sections -------------------------------------------------------------------------


def baselines_section(data: _Data) -> str:
    if not data.baselines:
        return "## Baselines\n\n_No baseline models evaluated._"
    tasks = data.tasks(data.baselines)
    headers = ["Model", *(data.header(t) for t in tasks), "status"]
    rows = [
        [baseline_name(b), *(acc_cell(b, data.final[b.id], t) for t in tasks), b.status]
        for b in data.baselines
    ]
    return "## Baselines\n\n" + markdown_table(headers, rows)


def method_section(method: str, runs: list[StoredRun], data: _Data) -> str:
    """One method's table: baselines first, then one row per unlearn run."""
    varying, fixed = split_config_keys([r.config for r in runs])
    terms = list(dict.fromkeys(t for r in runs for t in r.final if t not in NOT_LOSS_TERMS))
    tasks = data.tasks([*data.baselines, *runs])
    show_job = any(r.job_id for r in runs)
    notes = {r.id: _run_note(r, data.final[r.id]) for r in [*data.baselines, *runs]}
    show_notes = any(notes.values())

    headers = ["run", *(["job"] if show_job else []), *column_headers(varying)]
    headers += [_loss_header(t) for t in terms] + [data.header(t) for t in tasks] + ["status"]
    headers += ["notes"] if show_notes else []
    rows = []
    for b in data.baselines:
        row = [baseline_name(b), *([MISSING] if show_job else []), *(MISSING for _ in varying)]
        row += [MISSING for _ in terms] + [acc_cell(b, data.final[b.id], t) for t in tasks]
        rows.append(row + [b.status] + ([notes[b.id]] if show_notes else []))
    for r in runs:
        flat = flatten(r.config)
        row = [r.id, *([r.job_id or MISSING] if show_job else [])]
        row += [format_value(flat[k]) if k in flat else MISSING for k in varying]
        row += [_loss_cell(r, t) for t in terms]
        row += [acc_cell(r, data.final[r.id], t) for t in tasks]
        rows.append(row + [r.status] + ([notes[r.id]] if show_notes else []))

    parts = [f"## Method `{method}`", ""]
    # An unset option (null: "use the default / the world's") says nothing a reader needs.
    fixed = {k: v for k, v in fixed.items() if v is not None}
    if fixed:
        settings = ", ".join(f"`{k}={format_value(v)}`" for k, v in fixed.items())
        parts += [f"Fixed settings: {settings}", ""]
    parts.append(markdown_table(headers, rows))
    return "\n".join(parts)


def tamper_section(data: _Data, store: Store) -> str:
    if not data.attacks:
        return "## Tamper attacks\n\n_No tamper attacks._"
    task = _primary_task(data)
    if task is None:
        return "## Tamper attacks\n\n_No attack has a forget evaluation yet._"
    by_id = {r.id: r for r in [*data.baselines, *data.unlearn, *data.attacks]}
    curves = {a.id: store.curve(a.id, task) for a in data.attacks}
    n = middle_step(
        [[r.step for r in c] for a, c in curves.items() if by_id[a].status == "done" and c]
    )
    target = data.target()
    original = data.done_acc(target, task) if target else None
    others = [
        t
        for t in data.tasks(data.attacks)
        if t != task and data.roles.get(t) in ("forget", "retain")
    ]

    headers = ["attacked model", "attack run", "step 0", *([f"step {n}"] if n is not None else [])]
    headers += ["final", "recovery", "steps to half recovery", "AUC"]
    headers += [f"{t if t in TASK_HEADERS else data.header(t)} final" for t in others]
    headers += ["status", "notes"]
    rows = []
    for a in data.attacks:
        cells = _tamper_cells(a, curves[a.id], n, original)
        cells += [acc_cell(a, data.final[a.id], t) for t in others]
        rows.append(
            [_attacked_label(a, by_id), a.id, *cells, a.status, _run_note(a, data.final[a.id])]
        )

    original_text = pct(original) if original is not None else "unknown"
    legend = (
        f"Forget accuracy along the attack is task `{task}`. recovery = final - step 0; steps to "
        f"half recovery = attack steps until accuracy first regains half the gap between step 0 "
        f'and the original target ({original_text}) ("never" if it does not, "-" if there is '
        f"no gap); AUC = mean accuracy over the attack (trapezoid, normalised by the step range)."
    )
    return "## Tamper attacks\n\n" + markdown_table(headers, rows) + "\n\n" + legend


def _tamper_cells(
    attack: StoredRun, curve: list[EvalRow], n: int | None, original: float | None
) -> list[str]:
    """step 0, [step N], final, recovery, steps to half recovery, AUC for one attack."""
    width = 6 if n is not None else 5
    if attack.status != "done":
        return [attack.status] * width
    if not curve:
        return [MISSING] * width
    at = {r.step: r for r in curve}
    steps = [curve[0], *([at.get(n)] if n is not None else []), curve[-1]]
    cells = [result_cell(row) for row in steps]
    if any(r.value is None for r in curve):
        return cells + [EVAL_FAILED] * 3
    s = tamper_summary([(r.step, r.value) for r in curve], original)
    if s.gap is None or s.gap <= 0:
        half = MISSING
    else:
        half = "never" if s.half_gap_steps is None else str(s.half_gap_steps)
    return [*cells, f"{100 * s.recovery:+.2f} pts", half, pct(s.auc)]


# -- plots -------------------------------------------------------------------------------------


def _plot_forget_vs_retain(data: _Data, path: Path) -> int:
    """Scatter of every finished unlearn run on the suite's first forget and retain tasks;
    returns the number of runs plotted."""
    forget, retain = data.first("forget") or "forget", data.first("retain") or "retain"
    series = []
    for method in sorted({r.method or "?" for r in data.unlearn}):
        xy = [
            (data.done_acc(r, forget), data.done_acc(r, retain))
            for r in data.unlearn
            if (r.method or "?") == method
        ]
        xy = [(x, y) for x, y in xy if x is not None and y is not None]
        if xy:
            series.append((method, xy))
    baselines = [
        BaselinePoint(baseline_name(b), x, y, b.config.get("role"))
        for b in data.baselines
        if (x := data.done_acc(b, forget)) is not None
        and (y := data.done_acc(b, retain)) is not None
    ]
    plot_forget_vs_retain(series, baselines, path, data.header(forget), data.header(retain))
    return sum(len(xy) for _, xy in series)


def _plot_tamper_curves(data: _Data, store: Store, task: str, path: Path) -> None:
    # The attacked models' labels as the plot always named them: an attack of an attack is
    # named by its parent's directory (the table names it by the parent run).
    by_id = {r.id: r for r in [*data.baselines, *data.unlearn]}
    labels = [_attacked_label(a, by_id) for a in data.attacks]
    curves = []
    for a, label in zip(data.attacks, labels, strict=True):
        curve = [(r.step, r.value) for r in store.curve(a.id, task) if r.value is not None]
        # A model attacked twice (two recipes) needs the attack's id to tell the lines apart.
        name = f"{label} [{a.id}]" if labels.count(label) > 1 else label
        curves.append((name, curve if a.status == "done" else []))
    target = data.target()
    original = data.done_acc(target, task) if target else None
    plot_tamper_curves(
        curves, None if original is None else (baseline_name(target), original), task, path
    )


# -- the report --------------------------------------------------------------------------------


def _summary_line(data: _Data) -> str:
    runs = [*data.baselines, *data.unlearn, *data.attacks]
    if not runs:
        return "The store holds no runs yet."
    counts = {s: sum(r.status == s for r in runs) for s in STATUSES}
    statuses = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return (
        f"{len(runs)} runs ({len(data.baselines)} baseline, {len(data.unlearn)} unlearn, "
        f"{len(data.attacks)} attack): {statuses}."
    )


def summary(store: Store, out_dir: str | Path, best: Sequence[str] = ()) -> str:
    """The campaign in a screenful, for a terminal: the baselines with the `best` unlearning
    runs (ids) under them, the tamper table, and where the report and its plots are (the path
    of report.md on the last line)."""
    out_dir = Path(out_dir)
    data = _Data.load(store)
    by_id = {r.id: r for r in data.unlearn}
    runs = [*data.baselines, *(by_id[i] for i in best if i in by_id)]
    tasks = data.tasks(runs)
    headers = ["model", *(data.header(t) for t in tasks), "status"]
    rows = [
        [baseline_name(r) if r.kind == "baseline" else f"{r.id} ({r.method})",
         *(acc_cell(r, data.final[r.id], t) for t in tasks), r.status]
        for r in runs
    ]  # fmt: skip
    parts = [
        "## Baselines and the best run of each method\n\n" + markdown_table(headers, rows),
        tamper_section(data, store),
    ]
    plots = [name for name in (SCATTER_PNG, TAMPER_PNG) if (out_dir / name).exists()]
    if plots:
        parts.append("plots: " + ", ".join(str(out_dir / name) for name in plots))
    parts.append(f"report: {out_dir / 'report.md'}")
    return "\n\n".join(parts)


def render_report(store: Store, out_dir: str | Path) -> Path:
    """Write out_dir/report.md (and its PNGs beside it); returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _Data.load(store)
    parts = [
        "# Results",
        _summary_line(data),
        "Accuracies are percentages on 4-choice questions (chance 25%). A word in a result cell "
        "means there is no number: the run is pending, running, failed, diverged or collapsed, "
        'or its evaluation failed ("eval failed"); "-" means not measured.',
        baselines_section(data),
    ]
    methods = sorted({r.method or "?" for r in data.unlearn})
    if not methods:
        parts.append("## Unlearning runs\n\n_No unlearning runs yet._")
    for method in methods:
        parts.append(
            method_section(method, [r for r in data.unlearn if (r.method or "?") == method], data)
        )

    (out_dir / SCATTER_PNG).unlink(missing_ok=True)
    if data.unlearn or data.baselines:
        plotted = _plot_forget_vs_retain(data, out_dir / SCATTER_PNG)
        skipped = len(data.unlearn) - plotted
        note = (
            f" Not plotted (no finished forget and retain result): {skipped} run(s)."
            if skipped
            else ""
        )
        parts.append(
            f"## Forget vs retain\n\n![forget vs retain accuracy]({SCATTER_PNG})\n\n"
            "Black markers are the baseline models (forget, retain in the legend); the dashed "
            f"line joins the Pareto front.{note}"
        )

    parts.append(tamper_section(data, store))
    (out_dir / TAMPER_PNG).unlink(missing_ok=True)
    task = _primary_task(data)
    if task is not None:
        _plot_tamper_curves(data, store, task, out_dir / TAMPER_PNG)
        parts.append(f"![tamper curves]({TAMPER_PNG})")

    path = out_dir / "report.md"
    atomic_write_text(path, "\n\n".join(parts) + "\n")
    return path
