"""pareto.png: every complete trial, the front highlighted, the baselines as reference points.

Every number drawn is on the selection questions (what the search compared), labelled so; the
chosen trials' report numbers are in search.md.

Left panel: forget accuracy (↓) against the weakest retain task (↑), with the constraint's
floor; the front is the (forget, retain) front of the complete trials (for a three-objective
search, the front Optuna found, which a 2-D view cannot show as a line). Right panel, for a
search with robustness: forget against the measured worst case, with the filtered twin's.
Pruned and failed trials have no numbers and are not drawn; the title counts them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from unlearn.report.analysis import pareto_front
from unlearn.report.plots import BASELINE_MARKERS, CHANCE, new_figure, save_figure
from unlearn.search.spec import Search

if TYPE_CHECKING:  # outputs.py draws the front with this module
    from unlearn.search.outputs import SearchResult


def plot_front(search: Search, result: SearchResult, path: Path) -> None:
    done = [t for t in result.trials if t.status == "done"]
    points = [(t.forget, min(t.retains.values())) for t in done]
    if search.goal == "pareto" and search.robustness is not None:
        front = {t.number for t in result.front}
    else:
        front = {done[i].number for i in pareto_front(points)}
    robust = search.robustness is not None
    fig = new_figure(5.5)
    axes = fig.subplots(1, 2 if robust else 1, squeeze=False)[0]
    ax = axes[0]
    rest = [p for t, p in zip(done, points, strict=True) if t.number not in front]
    best = [(t, p) for t, p in zip(done, points, strict=True) if t.number in front]
    if rest:
        ax.scatter(*zip(*rest, strict=True), s=22, c="0.65", label="trial")
    if best:
        best.sort(key=lambda tp: tp[1][0])
        xs, ys = zip(*(p for _, p in best), strict=True)
        # A 2-D front is a line; a 3-objective one seen in 2-D is only its points.
        ax.plot(xs, ys, "o" if robust else "-o", c="tab:red", ms=6, label="front")
    for i, b in enumerate(result.baselines):
        if b.forget is None or not b.retains:
            continue
        retain = min(v for v in b.retains.values() if v is not None)
        ax.scatter([b.forget], [retain], marker=BASELINE_MARKERS[i % len(BASELINE_MARKERS)],
                   s=140, edgecolors="black", zorder=5,
                   label=f"{b.label} ({100 * b.forget:.1f}, {100 * retain:.1f})")  # fmt: skip
    target = result.baselines[0] if result.baselines else None
    if target is not None and target.retains:
        floors = [target.retains[t] - search.delta for t in search.retain_tasks
                  if target.retains.get(t) is not None]  # fmt: skip
        if floors:
            ax.axhline(min(floors), ls="--", c="tab:green", lw=1,
                       label=f"lowest retain floor (reference - {search.delta:g})")  # fmt: skip
    ax.axvline(CHANCE, ls=":", c="0.4", lw=1, label="chance")
    ax.set_xlabel(f"{search.forget_task} accuracy, selection questions (lower is better)")
    ax.set_ylabel(f"min over retain tasks: {', '.join(search.retain_tasks)} (selection)")
    ax.legend(fontsize=7, loc="best")
    if robust:
        _worst_case_panel(axes[1], done, front, search)
    skipped = len(result.trials) - len(done)
    fig.suptitle(f"search {search.name}: {len(done)} complete trials"
                 + (f" ({skipped} pruned, failed or unfinished not drawn)" if skipped else ""),
                 fontsize=10)  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_figure(fig, tmp)
    os.replace(tmp, path)


def _worst_case_panel(ax, done, front: set[int], search: Search) -> None:
    measured = [t for t in done if t.worst_case is not None]
    for on_front in (False, True):
        rows = [t for t in measured if (t.number in front) == on_front]
        if rows:
            ax.scatter([t.forget for t in rows], [t.worst_case for t in rows],
                       s=40 if on_front else 22, c="tab:red" if on_front else "0.65",
                       label="front" if on_front else "trial (constraint met)")  # fmt: skip
    twins = [t.worst_case - t.gap for t in measured if t.gap is not None]
    if twins:
        ax.axhline(twins[0], ls="--", c="tab:blue", lw=1, label="filtered twin's worst case")
    ax.set_xlabel(f"{search.forget_task} accuracy (lower is better)")
    ax.set_ylabel("robustness worst case (lower is better)")
    ax.legend(fontsize=7, loc="best")
