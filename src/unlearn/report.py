"""Markdown tables and PNG plots from a results store, in the style of the tables users keep.

`render_report(store, out_dir)` writes `report.md` and, beside it, `forget_vs_retain.png` and
`tamper_curves.png` (when there is something to plot).

Design choices:
- A number is shown only for a finished run with a finished eval. A pending, running, failed,
  diverged or collapsed run shows its status word in every result cell, a failed eval shows
  "eval failed", a task never measured shows "-". A missing result is never printed as a number
  (a failed eval read as chance accuracy looks like perfect unlearning).
- Accuracy is the "acc" metric; the latest evaluated step of each task is the final result.
- One table per method: the baselines first, then one row per unlearn run with only the
  hyperparameters that vary among that method's runs (the fixed ones are listed above it), the
  final value of each loss term, accuracies and status.
- Baseline runs are named by their config "name" and ordered by their config "role" (target,
  ignorant, filtered); the original model of the tamper comparison is the baseline whose role is
  "target" (else the first baseline).
- The tamper summary numbers come from the pure function `tamper_summary`, tested by hand.
- Plots use matplotlib's object API on an Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unlearn.eval.table import TASK_HEADERS, pct
from unlearn.fsutil import atomic_write_text
from unlearn.rundir import STATUSES, EvalRow
from unlearn.store import Store, StoredRun

CHANCE = 0.25
"""Accuracy of guessing on 4-choice questions."""
ACC = "acc"
FORGET_TASKS = ("forget", "forget_heldout")
BASELINE_ROLES = ("target", "ignorant", "filtered")
"""Baseline rows come in this order of their config "role" (others after them)."""
TASK_ORDER = ("forget", "forget_heldout", "retain")
PREFERRED_ORDER = (
    "retain_coef", "remove_coef", "lr", "muon_lr", "adam_lr", "num_train_examples", "epochs",
    "steps", "batch_size", "lora_r", "optimizer", "retain_loss", "layers",
)  # fmt: skip
"""Hyperparameter columns in this order, then the rest alphabetically."""
NOT_LOSS_TERMS = frozenset({"lr", "grad_norm"})
"""Training-state values some runs keep beside their loss terms; not loss columns."""
BOOKKEEPING_KEYS = frozenset({"name", "role", "output", "output_dir", "out", "out_dir", "run_dir"})
"""Config keys that name or place a run rather than configure it: never a table column."""
SCATTER_PNG, TAMPER_PNG = "forget_vs_retain.png", "tamper_curves.png"
NOTE_CHARS = 80


# -- cell formatting ---------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Make text safe inside a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _note(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= NOTE_CHARS else text[: NOTE_CHARS - 1] + "…"


def format_value(value: Any) -> str:
    """A config value for a table cell: 0.001 -> "0.001", 5.0 -> "5", [5, 10] -> "[5, 10]"."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def format_loss(value: float | None) -> str:
    return "nan/inf" if value is None else f"{value:.4g}"


def _loss_cell(run: StoredRun, term: str) -> str:
    # A run that did not finish has no trustworthy final losses either: show its status.
    if run.status != "done":
        return run.status
    return format_loss(run.final[term]) if term in run.final else "-"


def acc_cell(run: StoredRun, final: dict[str, dict[str, EvalRow]], task: str) -> str:
    """The accuracy cell of one run and task: a percentage, or the word saying why not."""
    if run.status != "done":
        return run.status
    row = final.get(task, {}).get(ACC)
    if row is None:
        return "-"
    if row.status == "failed" or row.value is None:
        return "eval failed"
    return pct(row.value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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
    keys = {k for f in flat for k in f if _leaf(k) not in BOOKKEEPING_KEYS}
    varying, fixed = [], {}
    for key in keys:
        seen = {json.dumps(f.get(key, "<missing>"), sort_keys=True) for f in flat}
        if len(seen) > 1:
            varying.append(key)
        else:
            fixed[key] = flat[0][key]
    return sorted(varying, key=_key_order), {k: fixed[k] for k in sorted(fixed, key=_key_order)}


def _headers_for(keys: list[str]) -> list[str]:
    """Column titles: the last part of a nested key, unless two columns would share it."""
    leaves = [_leaf(k) for k in keys]
    return [
        leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(keys, leaves, strict=True)
    ]


def ordered_tasks(tasks: set[str]) -> list[str]:
    known = [t for t in TASK_ORDER if t in tasks]
    return known + sorted(tasks - set(TASK_ORDER))


def _task_header(task: str) -> str:
    return TASK_HEADERS.get(task, f"{task} acc")


def _loss_header(term: str) -> str:
    return term if term.endswith("loss") else f"{term} loss"


# -- the data a report needs -------------------------------------------------------------------


@dataclass
class _Data:
    baselines: list[StoredRun]
    unlearn: list[StoredRun]
    attacks: list[StoredRun]
    final: dict[str, dict[str, dict[str, EvalRow]]]
    """run id -> task -> metric -> latest row."""

    @classmethod
    def load(cls, store: Store) -> _Data:
        runs = store.runs()
        baselines = [r for r in runs if r.kind == "baseline"]
        return cls(
            baselines=sorted(baselines, key=lambda b: _role_rank(b.config.get("role"))),
            unlearn=[r for r in runs if r.kind == "unlearn"],
            attacks=[r for r in runs if r.kind == "attack"],
            final={r.id: store.final_evals(r.id) for r in runs},
        )

    def tasks(self, runs: Sequence[StoredRun]) -> list[str]:
        return ordered_tasks({t for r in runs for t, m in self.final[r.id].items() if ACC in m})

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


def baseline_name(run: StoredRun) -> str:
    return str(run.config.get("name") or run.id)


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
    headers = ["Model", *(_task_header(t) for t in tasks), "status"]
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

    headers = ["run", *(["job"] if show_job else []), *_headers_for(varying)]
    headers += [_loss_header(t) for t in terms] + [_task_header(t) for t in tasks] + ["status"]
    headers += ["notes"] if show_notes else []
    rows = []
    for b in data.baselines:
        row = [baseline_name(b), *(["-"] if show_job else []), *("-" for _ in varying)]
        row += ["-" for _ in terms] + [acc_cell(b, data.final[b.id], t) for t in tasks]
        rows.append(row + [b.status] + ([notes[b.id]] if show_notes else []))
    for r in runs:
        flat = flatten(r.config)
        row = [r.id, *([r.job_id or "-"] if show_job else [])]
        row += [format_value(flat[k]) if k in flat else "-" for k in varying]
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


@dataclass(frozen=True)
class TamperSummary:
    """Summary of one attack's forget-accuracy curve."""

    step0: float
    """Accuracy at the first evaluated step (the attack evaluates before its first update)."""
    final: float
    recovery: float
    """final - step0."""
    gap: float | None
    """original_acc - step0: what there is to recover (None when the original is unknown)."""
    half_gap_steps: int | None
    """Attack steps until the accuracy first reaches step0 + gap / 2 (at an evaluated step);
    None when it never does or there is no positive gap."""
    auc: float
    """Trapezoid area under the curve divided by the step range: the mean accuracy along the
    attack (the single value for a one-point curve)."""


def tamper_summary(curve: Sequence[tuple[int, float]], original_acc: float | None) -> TamperSummary:
    """Summarise an attack curve [(step, acc), ...] against the original model's accuracy."""
    if not curve:
        raise ValueError("an attack curve needs at least one point")
    steps = [s for s, _ in curve]
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"attack curve steps must increase strictly, got {steps}")
    (first, step0), (last, final) = curve[0], curve[-1]
    gap = None if original_acc is None else original_acc - step0
    half = None
    if gap is not None and gap > 0:
        threshold = step0 + gap / 2
        half = next((s - first for s, acc in curve if acc >= threshold), None)
    if last == first:
        auc = step0
    else:
        area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in itertools.pairwise(curve))
        auc = area / (last - first)
    return TamperSummary(step0, final, final - step0, gap, half, auc)


def middle_step(curves: Sequence[Sequence[int]]) -> int | None:
    """An interior step shared by every curve (the middle one), for a "step N" column."""
    if not curves:
        return None
    common = sorted(set.intersection(*(set(c) for c in curves)))
    interior = common[1:-1]
    return interior[len(interior) // 2] if interior else None


def _attacked_label(attack: StoredRun, by_id: dict[str, StoredRun]) -> str:
    parent = by_id.get(attack.parent or "")
    if parent is None:
        return Path(attack.parent).name if attack.parent else "?"
    if parent.kind == "baseline":
        return baseline_name(parent)
    return f"{parent.id} ({parent.method})" if parent.method else parent.id


def _primary_task(data: _Data) -> str | None:
    """The forget task whose curve the tamper table follows: held-out facts when measured
    (recovery there is latent knowledge, not re-learning), else the unlearned facts."""
    tasks = {t for a in data.attacks for t in data.final[a.id]}
    return next((t for t in reversed(FORGET_TASKS) if t in tasks), None)


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
        for t in (*FORGET_TASKS, "retain")
        if t != task and any(t in data.final[a.id] for a in data.attacks)
    ]

    headers = ["attacked model", "attack run", "step 0", *([f"step {n}"] if n is not None else [])]
    headers += ["final", "recovery", "steps to half recovery", "AUC"]
    headers += [f"{t} final" for t in others] + ["status", "notes"]
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
        return ["-"] * width

    def point(row: EvalRow | None) -> str:
        if row is None:
            return "-"
        return "eval failed" if row.value is None else pct(row.value)

    at = {r.step: r for r in curve}
    cells = [point(curve[0]), *([point(at.get(n))] if n is not None else []), point(curve[-1])]
    if any(r.value is None for r in curve):
        return cells + ["eval failed"] * 3
    s = tamper_summary([(r.step, r.value) for r in curve], original)
    if s.gap is None or s.gap <= 0:
        half = "-"
    else:
        half = "never" if s.half_gap_steps is None else str(s.half_gap_steps)
    return [*cells, f"{100 * s.recovery:+.2f} pts", half, pct(s.auc)]


# -- plots -------------------------------------------------------------------------------------

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LINE_STYLES = ("-", "--", "-.", ":")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (forget, retain) points no other point beats (lower forget and higher
    retain, one of them strictly), ordered by forget accuracy."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=150, bbox_inches="tight")


BASELINE_MARKERS = ("*", "P", "X", "h", "d")


def _scatter_layers(ax, series, front, stars, lines, legend: bool) -> None:
    """Draw the runs, the Pareto front, the baselines and the reference lines on `ax`."""
    for i, (method, xy) in enumerate(series):
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
            label=f"{name} ({100 * x:.1f}, {100 * y:.1f})" if legend else None,
        )
    for vertical, value, style, label in lines:
        draw = ax.axvline if vertical else ax.axhline
        draw(value, lw=1, **style, label=label if legend else None)


def plot_forget_vs_retain(data: _Data, path: Path) -> int:
    """Scatter of every finished unlearn run; returns the number of runs plotted.

    Baselines are legend entries (their own markers, values in the legend) rather than text
    labels, which collide when runs sit next to them. Reference lines: chance on both axes, the
    target's retain accuracy and the filtered twin's forget accuracy. When the runs crowd into
    a small corner of the full range (the usual picture: every run near the filtered twin), an
    inset shows that corner magnified.
    """
    fig = Figure(figsize=(8.5, 5.5))
    ax = fig.add_subplot()
    methods = sorted({r.method or "?" for r in data.unlearn})
    series: list[tuple[str, list[tuple[float, float]]]] = []
    for method in methods:
        xy = [
            (data.done_acc(r, "forget"), data.done_acc(r, "retain"))
            for r in data.unlearn
            if (r.method or "?") == method
        ]
        xy = [(x, y) for x, y in xy if x is not None and y is not None]
        if xy:
            series.append((method, xy))
    points = [pt for _, xy in series for pt in xy]
    front = sorted(points[i] for i in pareto_front(points)) if points else []
    stars = [
        (baseline_name(b), data.done_acc(b, "forget"), data.done_acc(b, "retain"), b)
        for b in data.baselines
    ]
    stars = [(name, x, y, b) for name, x, y, b in stars if x is not None and y is not None]
    chance = {"color": "tab:red", "ls": ":"}
    lines = [(True, CHANCE, chance, f"chance ({CHANCE:.2f})"), (False, CHANCE, chance, None)]
    for name, x, y, b in stars:
        role = b.config.get("role")
        if role == "target":
            lines.append((False, y, {"color": "0.45", "ls": "-."}, f"{name}: retain"))
        elif role == "filtered":
            lines.append((True, x, {"color": "0.45", "ls": (0, (5, 3))}, f"{name}: forget"))
    stars3 = [(name, x, y) for name, x, y, _ in stars]
    _scatter_layers(ax, series, front, stars3, lines, legend=True)
    if not points:
        message = "no finished run has both a forget and a retain result"
        ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_xlabel("forget accuracy (lower is better)")
    ax.set_ylabel("retain accuracy (higher is better)")
    ax.set_title("Unlearning runs: forget vs retain accuracy")
    ax.grid(alpha=0.3)
    _zoom_inset(ax, points, series, front, stars3, lines)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    _save(fig, path)
    return len(points)


def _zoom_inset(ax, points, series, front, stars, lines) -> None:
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


def plot_tamper_curves(data: _Data, store: Store, task: str, path: Path) -> None:
    fig = Figure(figsize=(8.5, 5.5))
    ax = fig.add_subplot()
    by_id = {r.id: r for r in [*data.baselines, *data.unlearn]}
    labels = [_attacked_label(a, by_id) for a in data.attacks]
    for i, (a, label) in enumerate(zip(data.attacks, labels, strict=True)):
        curve = [(r.step, r.value) for r in store.curve(a.id, task) if r.value is not None]
        if curve and a.status == "done":
            # A model attacked twice (two recipes) needs the attack's id to tell the lines apart;
            # past ten lines the colours repeat, so the line style changes.
            name = f"{label} [{a.id}]" if labels.count(label) > 1 else label
            ax.plot(
                *zip(*curve, strict=True),
                marker=MARKERS[i % len(MARKERS)],
                ms=4,
                lw=1.5,
                ls=LINE_STYLES[(i // 10) % len(LINE_STYLES)],
                color=f"C{i % 10}",
                label=name,
            )
    target = data.target()
    original = data.done_acc(target, task) if target else None
    if original is not None:
        ax.axhline(
            original,
            color="black",
            lw=1,
            ls="--",
            label=f"original: {baseline_name(target)} ({pct(original)})",
        )
    ax.axhline(CHANCE, color="tab:red", lw=1, ls=":", label=f"chance ({CHANCE:.2f})")
    ax.set_xlabel("attack step")
    ax.set_ylabel(f"{task} accuracy")
    ax.set_title(f"Tamper attack: recovery of {task} accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    _save(fig, path)


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
        plotted = plot_forget_vs_retain(data, out_dir / SCATTER_PNG)
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
        plot_tamper_curves(data, store, task, out_dir / TAMPER_PNG)
        parts.append(f"![tamper curves]({TAMPER_PNG})")

    path = out_dir / "report.md"
    atomic_write_text(path, "\n\n".join(parts) + "\n")
    return path
