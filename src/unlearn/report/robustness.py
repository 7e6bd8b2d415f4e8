"""The robustness scorecard of a report: one table per suite, one row per model (the baselines
first), a column per attack family and probe, the overall worst case, what reached it and the
gap to the filtered twin; and a plot of each model's worst fine-tuning attack with the twin's
and the target's worst cases as reference lines.

Everything is read from the store: a robustness run's evaluation rows hold each attack's and
probe's worst case (metric `worst_case`, task = the attack or probe name) and the overall worst
case (task = the held-out task; a failed row when an attack or probe has no result, with the
highest number seen as `worst_case_lower_bound`); its config names the suite (`suite_def`: which
family each name belongs to), the model and the comparison (`inputs_key`: one table per key, so
a model is never set beside references run on another held-out task or corpus). The curves come
from its attack runs (the runs whose parent it is), with the utility constraint applied by
`robustness.score.constrained_curve`, the function robustness.json was made with.

A partial result never reads like a complete one: its cell is `>= X% (partial)`, it has no gap,
and the families without a result are named under notes.
"""

from __future__ import annotations

from pathlib import Path

from unlearn.report.data import ReportData, role_rank
from unlearn.report.plots import plot_worst_case_curves
from unlearn.report.tables import MISSING, markdown_table, pct, result_cell
from unlearn.robustness.score import (
    FAMILY_ORDER,
    LATENT_NAME,
    SCORED_ATTACK,
    SEARCH_FAMILY,
    START_NAME,
    constrained_curve,
    curve_point,
    gap,
    latent_names,
    quant_name,
    trial_name,
)
from unlearn.runs.store import Store, StoredRun

WORST = "worst_case"
LOWER_BOUND = "worst_case_lower_bound"
ROBUSTNESS_PNG = "robustness_curves.png"
FAMILY_TITLES = {
    "finetune-forget": "fine-tune, forget data",
    "finetune-benign": "fine-tune, benign data",
    "finetune-searched": "fine-tune, searched",
    "probe-linear": "linear probe",
    "probe-lens": "tuned-lens read-out",
    "probe-ablation": "direction ablation",
    "probe-in_context": "in-context",
    "quant-int8": "int8 quantisation",
    "quant-int4": "int4 quantisation",
    "latent": "latent perturbation",
}


def _families(run: StoredRun) -> dict[str, str]:
    """{attack or probe name: family} of the suite a robustness run ran."""
    suite = run.config.get("suite_def") or {}
    names = {a["name"]: f"finetune-{a['data']}" for a in suite.get("attacks") or []}
    names.update({p: f"probe-{p}" for p in suite.get("probes") or []})
    # A quantisation scheme is a family of one row, named alike; the latent attack has a row
    # per radius, one family.
    names.update({quant_name(s): quant_name(s) for s in suite.get("quantize") or []})
    if suite.get("latent") is not None:
        radius = (suite["latent"] or {}).get("radius")
        names.update(dict.fromkeys(latent_names(radius), LATENT_NAME))
    # The attack search's rows: the grid's best carried over, then its trials.
    budget = suite.get("attack_budget") or 0
    if budget:
        names.update({n: SEARCH_FAMILY for n in (START_NAME, *map(trial_name, range(budget)))})
    return names


def _overall(data: ReportData, run: StoredRun):
    return data.final[run.id].get(run.config.get("heldout_task", ""), {}).get(WORST)


def _value(data: ReportData, run: StoredRun) -> float | None:
    """The model's complete worst case (None: partial, failed or not measured)."""
    row = _overall(data, run)
    return row.value if row is not None and row.status == "done" else None


def partial_cell(value: float) -> str:
    """A lower bound shown as one: `>= 61.20% (partial)`."""
    return f">= {pct(value)} (partial)"


def _overall_cell(data: ReportData, run: StoredRun) -> str:
    """The worst case, its lower bound marked partial, or why there is none."""
    row = _overall(data, run)
    if row is not None and row.status == "done":
        return pct(row.value)
    bound = data.final[run.id].get(run.config.get("heldout_task", ""), {}).get(LOWER_BOUND)
    if bound is not None and bound.status == "done" and bound.value is not None:
        return partial_cell(bound.value)
    if row is not None:
        return result_cell(row)  # failed
    return run.status if run.status != "done" else MISSING


def _label(run: StoredRun, by_id: dict[str, StoredRun]) -> str:
    role = run.config.get("role")
    if role in ("target", "filtered"):
        names = {b.config.get("role"): b.config.get("name") for b in by_id.values()
                 if b.kind == "baseline"}  # fmt: skip
        return str(names.get(role) or role)
    parent = by_id.get(run.parent or "")
    if parent is not None and parent.kind == "unlearn":
        return f"{parent.id} ({parent.method})"
    return str(run.config.get("label") or run.id)


def _order(run: StoredRun) -> tuple:
    role = run.config.get("role")
    return (0 if role in ("target", "filtered") else 1, role_rank(role), run.id)


def robustness_section(data: ReportData, store: Store, out_dir: Path | None) -> str | None:
    """The scorecard section (None when the store has no robustness run); draws the curves
    plot in `out_dir` (None: the tables only, for a terminal)."""
    if out_dir is not None:
        (out_dir / ROBUSTNESS_PNG).unlink(missing_ok=True)
    if not data.robustness:
        return None
    by_id = {r.id: r for r in store.runs()}
    suites: dict[str, list[StoredRun]] = {}
    for run in sorted(data.robustness, key=_order):
        # One table per comparison: the suite and its inputs (held-out task, corpora, ...).
        key = run.config.get("inputs_key") or run.config.get("suite_key")
        suites.setdefault(str(key), []).append(run)
    parts = ["## Robustness scorecard"]
    for key, runs in suites.items():
        parts.append(_table(data, runs, by_id, key))
    # The plot shows the suite with the most models (the demo has one).
    runs = max(suites.values(), key=len)
    if out_dir is not None and _plot(data, store, runs, by_id, out_dir / ROBUSTNESS_PNG):
        parts.append(f"![worst-case curves]({ROBUSTNESS_PNG})")
    return "\n\n".join(parts)


def _table(data: ReportData, runs: list[StoredRun], by_id: dict, key: str) -> str:
    first = runs[0].config
    families = {f for r in runs for f in _families(r).values()}
    shown = [f for f in FAMILY_ORDER if f in families]
    twin = next((r for r in runs if r.config.get("role") == "filtered"), None)
    twin_worst = _value(data, twin) if twin is not None else None
    headers = ["model", *(FAMILY_TITLES[f] for f in shown)]
    headers += [
        "worst case (↓)",
        "reached by",
        "gap to twin (↓)",
        "half recovery (steps)",
        "status",
        "notes",
    ]
    rows = []
    for run in runs:
        names = _families(run)
        results = {n: data.final[run.id].get(n, {}).get(WORST) for n in names}
        failed = [n for n, row in results.items() if row is not None and row.status == "failed"]
        cells, missing = [], []
        for family in shown:
            rows_f = [row for n, row in results.items() if names[n] == family and row is not None]
            values = [row.value for row in rows_f if row.status == "done"]
            if rows_f and len(values) < len(rows_f):
                missing.append(FAMILY_TITLES[family])
            if not values:
                cells.append("failed" if rows_f else MISSING)
            else:
                cells.append(pct(max(values)) if len(values) == len(rows_f)
                             else partial_cell(max(values)))  # fmt: skip
        worst = _value(data, run)
        reached = _reached_by(data, run, names, worst)
        g = gap(worst, twin_worst)
        notes = f"failed: {', '.join(failed)}" if failed else (run.error or "")
        if missing:
            notes = f"no result from: {', '.join(missing)}; {notes}"
        rows.append([
            _label(run, by_id), *cells, _overall_cell(data, run), reached,
            MISSING if g is None else f"{100 * g:+.2f} pts", _half(data, run), run.status, notes,
        ])  # fmt: skip
    legend = (
        f"Suite `{first.get('suite')}` ({key}) on `{first.get('heldout_task')}`. Each cell is the "
        "highest held-out forget accuracy the family reached: over the fine-tuning attacks' "
        "steps that keep every retain task within the suite's utility margin of its own "
        "accuracy before the attack, over the quantised and latent-perturbed models under the "
        "same margin, and over the probes' read-outs; step 0 (no attack) counts, "
        "so a cell is never below the model's own accuracy for attacks. gap to twin = worst "
        "case minus the filtered twin's under the identical suite and inputs (both complete); "
        "half recovery = the fewest attack steps to regain half the gap between the model and "
        "the original target (counting steps only). A failed attack or probe has no number and "
        "is named under notes; where one failed, the worst case is only a lower bound, shown "
        "as `>= X (partial)`."
    )
    return markdown_table(headers, rows) + "\n\n" + legend


def _half(data: ReportData, run: StoredRun) -> str:
    """The fewest attack steps to regain half the gap to the target ("-": no attack did, or
    there is no gap: the references)."""
    row = data.final[run.id].get(run.config.get("heldout_task", ""), {}).get("steps_to_half")
    return str(int(row.value)) if row is not None and row.value is not None else MISSING


def _reached_by(data: ReportData, run: StoredRun, names: dict[str, str], worst) -> str:
    if worst is None:  # partial: what reached the lower bound
        bound = data.final[run.id].get(run.config.get("heldout_task", ""), {}).get(LOWER_BOUND)
        worst = bound.value if bound is not None and bound.status == "done" else None
    if worst is None:
        return MISSING
    for name in names:
        row = data.final[run.id].get(name, {}).get(WORST)
        if row is not None and row.status == "done" and row.value == worst:
            return name
    return MISSING


def _worst_attack_curve(store: Store, run: StoredRun, by_id: dict) -> list:
    """The (step, acc, counts) curve of the model's fine-tuning attack with the highest worst
    case (the utility constraint applied as robustness.json applied it; a diverged attack's
    steps before it diverged count)."""
    cfg = run.config
    margin = float((cfg.get("suite_def") or {}).get("utility_margin", 0.10))
    heldout, retain = str(cfg.get("heldout_task")), list(cfg.get("retain_tasks") or [])
    best: tuple[float, list] | None = None
    for child in by_id.values():
        if child.parent != run.id or child.kind != "attack" or child.status not in SCORED_ATTACK:
            continue
        by_step: dict[int, dict] = {}
        for e in store.evals(child.id):
            if e.metric == "acc":
                by_step.setdefault(e.step, {})[e.task] = e.value if e.status == "done" else None
        points = [curve_point(s, v, heldout, retain) for s, v in sorted(by_step.items())]
        curve = constrained_curve(points, margin)
        counting = [r["heldout"] for r in curve if r["counts"]]
        if counting and (best is None or max(counting) > best[0]):
            best = (max(counting), [(r["step"], r["heldout"], r["counts"]) for r in curve
                                    if r["heldout"] is not None])  # fmt: skip
    return best[1] if best else []


def _plot(data: ReportData, store: Store, runs: list, by_id: dict, path: Path) -> bool:
    curves = [(_label(r, by_id), _worst_attack_curve(store, r, by_id)) for r in runs]
    if not any(c for _, c in curves):
        return False
    refs = [(_label(r, by_id), v) for r in runs if r.config.get("role") in ("filtered", "target")
            and (v := _value(data, r)) is not None]  # fmt: skip
    plot_worst_case_curves(curves, refs, str(runs[0].config.get("heldout_task")), path)
    return True
