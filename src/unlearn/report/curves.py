"""The report's training curves: unlearning runs evaluated while they trained (`--eval_every`
of run and distill, a search's intermediate evaluations), drawn as accuracy against the
training step on the suite's first forget task and the retain minimum.

Design choices:
- Only finished runs (status done) are drawn: the tables give numbers only to them (the one
  result-cell rule), and a plot must not show what a table calls failed.
- A run evaluated at one step only (its final evaluation) has no curve and is left out, so the
  section appears only when some run has one.
- Retain at a step is the minimum over the run's own retain tasks (`analysis.retain_aggregate`);
  a step missing one of them has no retain point.
"""

from __future__ import annotations

from pathlib import Path

from unlearn.report.analysis import retain_aggregate
from unlearn.report.data import ReportData
from unlearn.report.plots import plot_training_curves
from unlearn.report.tables import retain_min_label
from unlearn.runs.store import Store, StoredRun

TRAINING_PNG = "training_curves.png"

Curve = tuple[str, list[tuple[int, float]], list[tuple[int, float]]]
"""(legend label, [(step, forget acc), ...], [(step, retain acc), ...])."""


def _retain_tasks(run: StoredRun, data: ReportData) -> list[str]:
    suite = run.config.get("suite")
    tasks = suite.get("retain") if isinstance(suite, dict) else None
    return list(tasks) if isinstance(tasks, list) and tasks else data.retain_tasks


def training_curves(data: ReportData, store: Store) -> list[Curve]:
    """The curve of each finished unlearning run evaluated at two steps or more, in the
    report's run order."""
    forget = data.first("forget")
    if forget is None:
        return []
    curves = []
    for run in data.unlearn:
        if run.status != "done":
            continue
        steps: dict[int, dict[str, float | None]] = {}
        for row in store.evals(run.id):
            if row.metric == "acc":
                steps.setdefault(row.step, {})[row.task] = row.value
        if len(steps) < 2:
            continue
        retains = _retain_tasks(run, data)
        forget_curve, retain_curve = [], []
        for step, values in sorted(steps.items()):
            if values.get(forget) is not None:
                forget_curve.append((step, values[forget]))
            aggregate = retain_aggregate([values.get(t) for t in retains])
            if isinstance(aggregate, float):
                retain_curve.append((step, aggregate))
        label = f"{run.id} ({run.method})" if run.method else run.id
        curves.append((label, forget_curve, retain_curve))
    return curves


def training_section(data: ReportData, store: Store, out_dir: Path) -> str | None:
    """Draw OUT/training_curves.png and return the report's section, or None (and no PNG,
    an old one removed) when no run has a curve."""
    path = out_dir / TRAINING_PNG
    path.unlink(missing_ok=True)
    curves = training_curves(data, store)
    if not curves:
        return None
    forget = data.first("forget") or "forget"
    retains = data.retain_tasks
    retain = data.header(retains[0]) if len(retains) == 1 else retain_min_label(retains)
    plot_training_curves(curves, data.header(forget), retain, path)
    return (
        f"## Evaluation during training\n\n![training curves]({TRAINING_PNG})\n\n"
        "Runs evaluated while they trained (--eval_every): forget accuracy solid, retain "
        "dashed, at each evaluated step (step 0 is the model the run started from)."
    )
