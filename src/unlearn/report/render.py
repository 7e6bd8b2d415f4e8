"""The report: load a results store, write `report.md` with its tables and the PNGs beside it.

`render_report(store, out_dir)` writes `report.md` and, beside it, `forget_vs_retain.png`,
`training_curves.png` (`report.curves`) and `tamper_curves.png` (when there is something to
plot).

Design choices:
- Every result cell goes through `tables.result_cell`: a number only for a finished run with a
  finished eval; a pending, running, failed, diverged, collapsed or pruned run shows its status
  word, a failed eval "eval failed", a task never measured "-".
- Accuracy is the "acc" metric, a perplexity task's number its "ppl" (a number, lower is
  better); the latest evaluated step of each task is the final result (`data.ReportData`).
- One table per method: the baselines first, then one row per unlearn run with only the
  hyperparameters that vary among that method's runs (the fixed ones are listed above it), the
  final value of each loss term, results and status.
- "retain" as one number (the forget-vs-retain plot's y, the "retain min" column beside
  several retain tasks) is the minimum over the suite's retain tasks
  (`analysis.retain_aggregate`); each retain task keeps its own column.
- Baseline runs are named by their config "name" and ordered by their config "role" (target,
  checkpoint, ignorant, filtered); the original model of the tamper comparison is the baseline
  whose role is "target" (else the first baseline).
- Task columns come from the evaluation suites the runs recorded (run.json "suite": forget,
  retain and other tasks): forget tasks first with (↓), then retain tasks with (↑), then the
  others, each named as papers name the benchmark (`WMDP Bio Robust (↓) | MMLU (↑)`). The
  tamper table follows the world's held-out forget facts when measured, else the suite's first
  forget task, and reports the other forget and retain tasks (and their minimum) and the
  perplexity tasks at the end of the attack.
- The numbers come from pure functions (analysis.py) and the pictures from plots.py, which gets
  plain numbers: only this module and data.py (what a report reads of a store) read the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from unlearn.fsutil import atomic_write_text
from unlearn.report.analysis import middle_step, tamper_summary
from unlearn.report.curves import TRAINING_PNG, training_section
from unlearn.report.data import ReportData, attacked_run, baseline_name
from unlearn.report.plots import BaselinePoint, plot_forget_vs_retain, plot_tamper_curves
from unlearn.report.robustness import ROBUSTNESS_PNG, robustness_section
from unlearn.report.tables import (
    EVAL_FAILED,
    MISSING,
    RETAIN_MIN_HEADER,
    TASK_HEADERS,
    TIME_HEADER,
    column_headers,
    flatten,
    format_loss,
    format_seconds,
    format_value,
    markdown_table,
    pct,
    result_cell,
    retain_min_label,
    split_config_keys,
)
from unlearn.runs.rows import STATUSES, EvalRow
from unlearn.runs.store import Store, StoredRun

NOT_LOSS_TERMS = frozenset({"lr", "grad_norm"})
"""Training-state values some runs keep beside their loss terms; not loss columns."""
SCATTER_PNG, TAMPER_PNG = "forget_vs_retain.png", "tamper_curves.png"
NOTE_CHARS = 80


def _attacked_label(attack: StoredRun, by_id: dict[str, StoredRun]) -> str:
    """The attacked model's name: its run (an unlearn run by id and method, a baseline by
    name), found by id or by the model path an attack without --parent records; else the
    path's folder name."""
    models = [r for r in by_id.values() if r.kind in ("unlearn", "baseline")]
    parent = attacked_run(attack, by_id, models)
    if parent is None:
        return Path(attack.parent).name if attack.parent else "?"
    if parent.kind == "baseline":
        return baseline_name(parent)
    return f"{parent.id} ({parent.method})" if parent.method else parent.id


def _primary_task(data: ReportData) -> str | None:
    """The forget task whose curve the tamper table follows: the world's held-out facts when
    measured (recovery there is latent knowledge, not re-learning), else the first forget task
    of the suite that the attacks measured."""
    tasks = {t for a in data.attacks for t in data.final[a.id]}
    forget = [t for t, r in data.roles.items() if r == "forget"]
    return next((t for t in ["forget_heldout", *forget] if t in tasks), None)


# -- cells -------------------------------------------------------------------------------------


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


def baselines_section(data: ReportData) -> str:
    if not data.baselines:
        return "## Baselines\n\n_No baseline models evaluated._"
    columns = data.columns(data.baselines)
    headers = ["Model", *(h for h, _ in columns), "status"]
    rows = [[baseline_name(b), *(cell(b) for _, cell in columns), b.status] for b in data.baselines]
    return "## Baselines\n\n" + markdown_table(headers, rows)


def method_section(method: str, runs: list[StoredRun], data: ReportData) -> str:
    """One method's table: baselines first, then one row per unlearn run."""
    varying, fixed = split_config_keys([r.config for r in runs])
    terms = list(dict.fromkeys(t for r in runs for t in r.final if t not in NOT_LOSS_TERMS))
    columns = data.columns([*data.baselines, *runs])
    show_job = any(r.job_id for r in runs)
    notes = {r.id: _run_note(r, data.final[r.id]) for r in [*data.baselines, *runs]}
    show_notes = any(notes.values())

    headers = ["run", *(["job"] if show_job else []), *column_headers(varying)]
    headers += [_loss_header(t) for t in terms] + [h for h, _ in columns]
    headers += [TIME_HEADER, "status"] + (["notes"] if show_notes else [])
    rows = []
    for b in data.baselines:  # reference models: evaluated, never trained here
        row = [baseline_name(b), *([MISSING] if show_job else []), *(MISSING for _ in varying)]
        row += [MISSING for _ in terms] + [cell(b) for _, cell in columns]
        rows.append(row + [MISSING, b.status] + ([notes[b.id]] if show_notes else []))
    for r in runs:
        flat = flatten(r.config)
        row = [r.id, *([r.job_id or MISSING] if show_job else [])]
        row += [format_value(flat[k]) if k in flat else MISSING for k in varying]
        row += [_loss_cell(r, t) for t in terms]
        row += [cell(r) for _, cell in columns]
        row += [format_seconds(r.wall_seconds()), r.status]
        rows.append(row + ([notes[r.id]] if show_notes else []))

    parts = [f"## Method `{method}`", ""]
    # An unset option (null: "use the default / the world's") says nothing a reader needs.
    fixed = {k: v for k, v in fixed.items() if v is not None}
    if fixed:
        settings = ", ".join(f"`{k}={format_value(v)}`" for k, v in fixed.items())
        parts += [f"Fixed settings: {settings}", ""]
    parts.append(markdown_table(headers, rows))
    return "\n".join(parts)


def tamper_section(data: ReportData, store: Store) -> str:
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
    original = data.done_value(target, task) if target else None
    columns = _after_attack_columns(data, task)

    headers = ["attacked model", "attack run", "step 0", *([f"step {n}"] if n is not None else [])]
    headers += ["final", "recovery", "steps to half recovery", "AUC"]
    headers += [header for header, _ in columns] + ["status", "notes"]
    rows = []
    for a in data.attacks:
        cells = _tamper_cells(a, curves[a.id], n, original)
        cells += [cell(a) for _, cell in columns]
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


def _after_attack_columns(data: ReportData, task: str) -> list[tuple]:
    """The results at the end of the attacks beside the followed `task`: the other forget and
    retain tasks (the retain minimum after them when there are several) and the perplexity
    tasks (fluency after the attack's fine-tuning)."""
    shown = [
        t
        for t in data.tasks(data.attacks)
        if t != task and (data.roles.get(t) in ("forget", "retain") or t in data.ppl)
    ]
    columns = []
    for t in shown:
        # World accuracy tasks by name ("retain final"), as this table always showed them.
        name = t if t in TASK_HEADERS and t not in data.ppl else data.header(t)
        columns.append((f"{name} final", lambda r, t=t: data.cell(r, t)))
        if data.retain_min_after(t, shown):
            columns.append((f"{RETAIN_MIN_HEADER} final", data.retain_cell))
    return columns


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


def _plot_forget_vs_retain(data: ReportData, path: Path) -> int:
    """Scatter of every finished unlearn run on the suite's first forget task and the retain
    aggregate (the minimum over the retain tasks), with a forget-vs-perplexity panel under it
    when a perplexity task was measured; returns the number of runs on the main panel."""
    forget, retains = data.first("forget") or "forget", data.retain_tasks
    ppl = next((t for t in ["general_ppl", *sorted(data.ppl)] if t in data.ppl), None)
    series, ppl_series = [], []
    for method in sorted({r.method or "?" for r in data.unlearn}):
        runs = [r for r in data.unlearn if (r.method or "?") == method]
        xy = [(data.done_value(r, forget), data.retain_value(r)) for r in runs]
        xy = [(x, y) for x, y in xy if x is not None and y is not None]
        if xy:
            series.append((method, xy))
        if ppl is not None:
            xp = [(data.done_value(r, forget), data.done_value(r, ppl)) for r in runs]
            ppl_series.append((method, [(x, p) for x, p in xp if x is not None and p is not None]))
    baselines = [
        BaselinePoint(
            baseline_name(b), x, y, b.config.get("role"), data.done_value(b, ppl) if ppl else None
        )
        for b in data.baselines
        if (x := data.done_value(b, forget)) is not None and (y := data.retain_value(b)) is not None
    ]
    if len(retains) == 1:
        retain_label = data.header(retains[0])
    else:  # the axis says what the aggregate is
        retain_label = f"retain acc, {retain_min_label(retains)} (↑)"
    plot_forget_vs_retain(
        series, baselines, path, data.header(forget), retain_label,
        ppl_series, data.header(ppl) if ppl else None,
    )  # fmt: skip
    return sum(len(xy) for _, xy in series)


def _plot_tamper_curves(data: ReportData, store: Store, task: str, path: Path) -> None:
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
    original = data.done_value(target, task) if target else None
    plot_tamper_curves(
        curves, None if original is None else (baseline_name(target), original), task, path
    )


# -- the report --------------------------------------------------------------------------------


def _summary_line(data: ReportData) -> str:
    runs = [*data.baselines, *data.unlearn, *data.attacks, *data.robustness]
    if not runs:
        return "The store holds no runs yet."
    counts = {s: sum(r.status == s for r in runs) for s in STATUSES}
    statuses = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    suites = f", {len(data.robustness)} robustness" if data.robustness else ""
    return (
        f"{len(runs)} runs ({len(data.baselines)} baseline, {len(data.unlearn)} unlearn, "
        f"{len(data.attacks)} attack{suites}): {statuses}."
    )


def _reading_guide(data: ReportData) -> str:
    text = (
        "Accuracies are percentages on 4-choice questions (chance 25%). A word in a result cell "
        "means there is no number: the run is pending, running, failed, diverged, collapsed or "
        "pruned (stopped early by a search), "
        'or its evaluation failed ("eval failed"); "-" means not measured.'
    )
    if data.ppl:
        text += (
            " Perplexity (ppl, lower is better) is per token on held-out documents no model was "
            "trained on: a number, not a percentage."
        )
    if len(data.retain_tasks) > 1:
        text += (
            f" {RETAIN_MIN_HEADER} is the lowest accuracy over the retain tasks "
            f"({', '.join(data.retain_tasks)}): a method must keep every one."
        )
    if data.unlearn:
        text += (
            f" {TIME_HEADER} is an unlearning run's wall time from its start to its end: "
            "training, saving and its final evaluation (runs of a campaign that ran side by "
            "side shared the machine's cores)."
        )
    return text


def summary(store: Store, out_dir: str | Path, best: Sequence[str] = ()) -> str:
    """The campaign in a screenful, for a terminal: the baselines with the `best` unlearning
    runs (ids) under them, the tamper table, and where the report and its plots are (the path
    of report.md on the last line)."""
    out_dir = Path(out_dir)
    data = ReportData.load(store)
    by_id = {r.id: r for r in data.unlearn}
    runs = [*data.baselines, *(by_id[i] for i in best if i in by_id)]
    columns = data.columns(runs)
    headers = ["model", *(header for header, _ in columns), TIME_HEADER, "status"]
    rows = [
        [baseline_name(r) if r.kind == "baseline" else f"{r.id} ({r.method})",
         *(cell(r) for _, cell in columns),
         MISSING if r.kind == "baseline" else format_seconds(r.wall_seconds()), r.status]
        for r in runs
    ]  # fmt: skip
    parts = ["## Baselines and the best run of each method\n\n" + markdown_table(headers, rows)]
    if data.attacks or not data.robustness:
        parts.append(tamper_section(data, store))
    scorecard = robustness_section(data, store, None)
    if scorecard is not None:
        parts.append(scorecard)
    plots = [
        name
        for name in (SCATTER_PNG, TRAINING_PNG, TAMPER_PNG, ROBUSTNESS_PNG)
        if (out_dir / name).exists()
    ]
    if plots:
        parts.append("plots: " + ", ".join(str(out_dir / name) for name in plots))
    parts.append(f"report: {out_dir / 'report.md'}")
    return "\n\n".join(parts)


def render_report(store: Store, out_dir: str | Path) -> Path:
    """Write out_dir/report.md (and its PNGs beside it); returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ReportData.load(store)
    parts = ["# Results", _summary_line(data), _reading_guide(data), baselines_section(data)]
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
        if len(data.retain_tasks) > 1:
            note = " Retain is the minimum over the retain tasks." + note
        if data.ppl:
            note += " The lower panel shows the runs' perplexity (lower is better)."
        parts.append(
            f"## Forget vs retain\n\n![forget vs retain accuracy]({SCATTER_PNG})\n\n"
            "Black markers are the baseline models (forget, retain in the legend); the dashed "
            f"line joins the Pareto front.{note}"
        )

    curves = training_section(data, store, out_dir)  # runs evaluated while they trained
    if curves is not None:
        parts.append(curves)

    if data.attacks or not data.robustness:  # a campaign with suites only has no tamper table
        parts.append(tamper_section(data, store))
    (out_dir / TAMPER_PNG).unlink(missing_ok=True)
    task = _primary_task(data)
    if task is not None and data.attacks:
        _plot_tamper_curves(data, store, task, out_dir / TAMPER_PNG)
        parts.append(f"![tamper curves]({TAMPER_PNG})")

    scorecard = robustness_section(data, store, out_dir)
    if scorecard is not None:
        parts.append(scorecard)

    path = out_dir / "report.md"
    atomic_write_text(path, "\n\n".join(parts) + "\n")
    return path
