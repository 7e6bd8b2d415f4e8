"""The report's PNG plots, drawn from plain numbers (render.py picks them out of the store).

Design choices:
- matplotlib's object API on an Agg canvas: no pyplot global state, no display needed.
- matplotlib is imported inside the functions that draw: it is heavy, and importing the report
  package (for its tables) should not pay for it.
- A plot gets every row it could show, in the report's order, so a line's colour and marker
  depend only on its place in that order (an attack without a curve keeps its slot).
- Perplexity (lower is better, not an accuracy) gets its own panel under the forget-vs-retain
  scatter, sharing its forget axis, rather than a third axis or a colour scale on the scatter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearn.report.analysis import pareto_front
from unlearn.report.tables import pct

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CHANCE = 0.25
"""Accuracy of guessing on 4-choice questions."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LINE_STYLES = ("-", "--", "-.", ":")
BASELINE_MARKERS = ("*", "P", "X", "h", "d")

Points = Sequence[tuple[float, float]]
Line = tuple[bool, float, dict[str, Any], str | None]
"""A reference line: (vertical, value, style keywords, legend label)."""


@dataclass(frozen=True)
class BaselinePoint:
    """A baseline model on the forget-vs-retain scatter."""

    name: str
    forget: float
    retain: float
    role: str | None
    """The baseline's config role: "target" adds a retain line, "filtered" a forget line."""
    ppl: float | None = None
    """Its perplexity on the held-out documents, when measured (legend and lower panel)."""

    @property
    def label(self) -> str:
        """Its legend entry: `Target (81.2, 99.5)`, with `; ppl 3.42` when measured."""
        ppl = f"; ppl {self.ppl:.2f}" if self.ppl is not None else ""
        return f"{self.name} ({100 * self.forget:.1f}, {100 * self.retain:.1f}{ppl})"


def new_figure(height: float = 5.5) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(8.5, height))


def save_figure(fig: Figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def _scatter_layers(
    ax: Axes,
    series: Sequence[tuple[str, Points]],
    front: Points,
    stars: Sequence[tuple[str, float, float]],
    lines: Sequence[Line],
    legend: bool,
) -> None:
    """Draw the runs, the Pareto front, the baselines (`stars`: legend label, x, y) and the
    reference lines on `ax`."""
    for i, (method, xy) in enumerate(series):
        if not xy:  # a method without points here keeps its colour and marker
            continue
        ax.scatter(
            *zip(*xy, strict=True),
            marker=MARKERS[i % len(MARKERS)],
            s=42,
            color=f"C{i % 10}",
            alpha=0.85,
            label=method if legend else None,
            zorder=3,
        )
    if front:
        ax.plot(
            *zip(*front, strict=True),
            color="black",
            lw=1,
            ls="--",
            marker="o",
            ms=11,
            mfc="none",
            zorder=4,
            label="Pareto front" if legend else None,
        )
    for i, (name, x, y) in enumerate(stars):
        ax.scatter(
            [x],
            [y],
            marker=BASELINE_MARKERS[i % len(BASELINE_MARKERS)],
            s=160 if i == 0 else 90,
            color="0.2",
            ec="white",
            zorder=5,
            label=name if legend else None,
        )
    for vertical, value, style, label in lines:
        draw = ax.axvline if vertical else ax.axhline
        draw(value, lw=1, **style, label=label if legend else None)


def plot_forget_vs_retain(
    series: Sequence[tuple[str, Points]],
    baselines: Sequence[BaselinePoint],
    path: Path,
    forget: str = "forget accuracy",
    retain: str = "retain accuracy",
    ppl_series: Sequence[tuple[str, Points]] = (),
    ppl: str | None = None,
) -> None:
    """Scatter of the runs, one series (colour, marker) per method: [(method, [(forget, retain),
    ...]), ...], with the Pareto front over all of them. `retain` names the y axis (with several
    retain tasks the caller passes their minimum and says so).

    With `ppl_series` ([(method, [(forget, ppl), ...]), ...]) and `ppl` (the perplexity task's
    header) a lower panel shows each run's perplexity against the same forget axis, each method
    in its upper-panel colour, the baselines' perplexities as stars and the target's as a line:
    fluency damage that the accuracies do not show.

    Baselines are legend entries (their own markers, values in the legend) rather than text
    labels, which collide when runs sit next to them. Reference lines: chance on both axes, the
    target's retain accuracy and the filtered twin's forget accuracy. When the runs crowd into
    a small corner of the full range (the usual picture: every run near the filtered twin), an
    inset shows that corner magnified.
    """
    with_ppl = ppl is not None and (
        any(xy for _, xy in ppl_series) or any(b.ppl is not None for b in baselines)
    )
    fig = new_figure(9.0 if with_ppl else 5.5)
    if with_ppl:
        ax, low = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    else:
        ax, low = fig.add_subplot(), None
    points = [pt for _, xy in series for pt in xy]
    front = sorted(points[i] for i in pareto_front(points)) if points else []
    chance = {"color": "tab:red", "ls": ":"}
    lines: list[Line] = [
        (True, CHANCE, chance, f"chance ({CHANCE:.2f})"),
        (False, CHANCE, chance, None),
    ]
    for b in baselines:
        if b.role == "target":
            lines.append((False, b.retain, {"color": "0.45", "ls": "-."}, f"{b.name}: retain"))
        elif b.role == "filtered":
            dashed = {"color": "0.45", "ls": (0, (5, 3))}
            lines.append((True, b.forget, dashed, f"{b.name}: forget"))
    stars = [(b.label, b.forget, b.retain) for b in baselines]
    _scatter_layers(ax, series, front, stars, lines, legend=True)
    if not points:
        message = "no finished run has both a forget and a retain result"
        ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="0.4")
    # The axes name the suite's tasks (`WMDP Bio Robust (↓)`, or the world's "forget acc (↓)").
    if low is None:  # else the lower panel carries the shared forget axis
        ax.set_xlabel(f"{forget}: lower is better")
    sep = ":\n" if len(retain) > 40 else ": "  # a long name (the retain aggregate's) wraps
    ax.set_ylabel(f"{retain}{sep}higher is better")
    ax.set_title("Unlearning runs: forget vs retain accuracy")
    ax.grid(alpha=0.3)
    _zoom_inset(ax, points, series, front, stars, lines)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if low is not None:
        _ppl_panel(low, series, ppl_series, baselines, ppl or "perplexity")
        low.set_xlabel(f"{forget}: lower is better")
    save_figure(fig, path)


def _ppl_panel(
    ax: Axes,
    series: Sequence[tuple[str, Points]],
    ppl_series: Sequence[tuple[str, Points]],
    baselines: Sequence[BaselinePoint],
    ppl: str,
) -> None:
    """The lower panel: (forget, ppl) of each run in its method's colour and marker, the
    baselines' as stars, the target's perplexity as a dashed line."""
    index = {method: i for i, (method, _) in enumerate(series)}
    for method, _ in ppl_series:
        index.setdefault(method, len(index))
    by_method = dict(ppl_series)
    ordered = [(m, by_method.get(m, [])) for m in sorted(index, key=index.get)]
    stars = [(b.name, b.forget, b.ppl) for b in baselines if b.ppl is not None]
    lines: list[Line] = [
        (False, b.ppl, {"color": "0.45", "ls": "-."}, None)
        for b in baselines
        if b.role == "target" and b.ppl is not None
    ]
    _scatter_layers(ax, ordered, [], stars, lines, legend=False)
    ax.set_ylabel(f"{ppl}: lower is better")
    ax.grid(alpha=0.3)


def _zoom_inset(
    ax: Axes,
    points: Points,
    series: Sequence[tuple[str, Points]],
    front: Points,
    stars: Sequence[tuple[str, float, float]],
    lines: Sequence[Line],
) -> None:
    """Magnify the runs' corner when it spans under a quarter of both axes' ranges."""
    if len(points) < 2:
        return
    xs, ys = [x for x, _ in points], [y for _, y in points]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    if max(xs) - min(xs) > (x1 - x0) / 4 or max(ys) - min(ys) > (y1 - y0) / 4:
        return
    pad_x = max(0.02, (max(xs) - min(xs)) * 0.25)
    pad_y = max(0.01, (max(ys) - min(ys)) * 0.25)
    box = (min(xs) - pad_x, max(xs) + pad_x, min(ys) - pad_y, max(ys) + pad_y)
    # Where the data are not: the runs sit near the filtered twin (high retain, low forget), so
    # the empty middle-right of the axes holds the inset.
    inset = ax.inset_axes((0.38, 0.12, 0.45, 0.45))
    _scatter_layers(inset, series, front, stars, lines, legend=False)
    inset.set_xlim(box[0], box[1])
    inset.set_ylim(box[2], box[3])
    inset.tick_params(labelsize=7)
    inset.grid(alpha=0.3)
    inset.set_title("runs, magnified", fontsize=8)
    ax.indicate_inset_zoom(inset, edgecolor="0.5")


def plot_tamper_curves(
    curves: Sequence[tuple[str, Sequence[tuple[int, float]]]],
    original: tuple[str, float] | None,
    task: str,
    path: Path,
) -> None:
    """One line per attack: [(legend label, [(step, acc), ...]), ...] in the report's order (an
    empty curve draws nothing); `original` is (name, accuracy) of the model before unlearning."""
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (name, curve) in enumerate(curves):
        if curve:
            # Past ten lines the colours repeat, so the line style changes.
            ax.plot(
                *zip(*curve, strict=True),
                marker=MARKERS[i % len(MARKERS)],
                ms=4,
                lw=1.5,
                ls=LINE_STYLES[(i // 10) % len(LINE_STYLES)],
                color=f"C{i % 10}",
                label=name,
            )
    if original is not None:
        name, acc = original
        ax.axhline(acc, color="black", lw=1, ls="--", label=f"original: {name} ({pct(acc)})")
    ax.axhline(CHANCE, color="tab:red", lw=1, ls=":", label=f"chance ({CHANCE:.2f})")
    ax.set_xlabel("attack step")
    ax.set_ylabel(f"{task} accuracy")
    ax.set_title(f"Tamper attack: recovery of {task} accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    save_figure(fig, path)


def plot_training_curves(
    curves: Sequence[tuple[str, Sequence[tuple[int, float]], Sequence[tuple[int, float]]]],
    forget: str,
    retain: str,
    path: Path,
) -> None:
    """Runs evaluated while they trained: [(legend label, [(step, forget acc), ...], [(step,
    retain acc), ...]), ...]; each run one colour, forget solid, retain dashed (hollow
    markers), so unlearning and the damage it does read off one picture."""
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (name, forgets, retains) in enumerate(curves):
        color, marker = f"C{i % 10}", MARKERS[i % len(MARKERS)]
        if forgets:
            ax.plot(*zip(*forgets, strict=True), marker=marker, ms=4, lw=1.5, color=color,
                    label=f"{name}: forget")  # fmt: skip
        if retains:
            ax.plot(*zip(*retains, strict=True), marker=marker, ms=4, mfc="none", lw=1.2,
                    ls="--", color=color, label=f"{name}: retain")  # fmt: skip
    ax.axhline(CHANCE, color="tab:red", lw=1, ls=":", label=f"chance ({CHANCE:.2f})")
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy")
    # The task names can be long (the retain minimum lists its tasks): a subtitle, not the axis.
    ax.set_title(f"Evaluation during training\nsolid: {forget}; dashed: {retain}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    save_figure(fig, path)


def plot_worst_case_curves(
    curves: Sequence[tuple[str, Sequence[tuple[int, float, bool]]]],
    references: Sequence[tuple[str, float]],
    task: str,
    path: Path,
) -> None:
    """Each model's worst fine-tuning attack: [(label, [(step, acc, counts), ...]), ...]; steps
    that break the utility constraint are hollow markers (plotted, never the worst case).
    `references` are (name, worst case) horizontal lines: the filtered twin and the target."""
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (name, curve) in enumerate(curves):
        if not curve:
            continue
        color = f"C{i % 10}"
        steps, accs, _ = zip(*curve, strict=True)
        ax.plot(steps, accs, lw=1.5, color=color, ls=LINE_STYLES[(i // 10) % len(LINE_STYLES)],
                label=name)  # fmt: skip
        marker = MARKERS[i % len(MARKERS)]
        kept = [(s, a) for s, a, c in curve if c]
        broke = [(s, a) for s, a, c in curve if not c]
        if kept:
            ax.plot(*zip(*kept, strict=True), ls="", marker=marker, ms=5, color=color)
        if broke:
            ax.plot(*zip(*broke, strict=True), ls="", marker=marker, ms=6, mfc="none",
                    color=color)  # fmt: skip
    for j, (name, acc) in enumerate(references):
        ax.axhline(acc, color="black", lw=1, ls=("--", ":", "-.")[j % 3],
                   label=f"{name} worst case ({pct(acc)})")  # fmt: skip
    ax.axhline(CHANCE, color="tab:red", lw=0.8, ls=":", label=f"chance ({CHANCE:.2f})")
    ax.set_xlabel("attack step")
    ax.set_ylabel(f"{task} accuracy")
    ax.set_title("Worst fine-tuning attack per model (hollow: breaks the utility constraint)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    save_figure(fig, path)
