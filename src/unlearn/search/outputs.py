"""What a search writes: OUT/search.md (the tables), OUT/pareto.png and OUT/best.yaml.

Design choices:
- Rows are read from the study (numbers, set only for complete trials) and the baselines' run
  directories. A pruned, failed, interrupted or running trial shows its status word and no
  number, wherever it appears (`report.tables.result_cell`): it is never a result.
- The boundary table follows the reference campaign's tables: the baselines first, then one row per
  trial with the fields the search varied, then each task (forget ↓, retain ↑) as a percentage, the
  constraint margin and the status. It holds the trials nearest the boundary (smallest
  |margin|, the best always included), sorted by forget accuracy; every trial is in the table
  below it.
- Two sets of numbers (`unlearn.eval.split`): the trial tables and the choice use the
  selection part of each task; the chosen trials (the best, the front) are shown again on the
  report part, which played no role in choosing them: the numbers to quote. Both are labelled.
- The best trial: for `boundary` (and a two-objective front) the complete trial of lowest
  forget that satisfies the constraint; for a three-objective front, the smallest worst case
  (the smallest gap to the filtered twin) among constraint-satisfying trials with forget <=
  `max_forget`. Either way only a trial whose forget accuracy is below the target's (by more
  than the tolerance) can be best: when none is, the outputs say that no trial unlearned
  anything rather than name one. best.yaml is its run config (method, world or model, the fixed
  fields, the searched values), replayed by `unlearn run --config best.yaml --out DIR`, with
  both sets of numbers in its header.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import yaml

from unlearn.fsutil import atomic_write_text, read_jsonl
from unlearn.report.tables import markdown_table, pct, result_cell, task_header
from unlearn.search.spec import OUTPUT_MARKS, SELECT_PERCENT, Search
from unlearn.search.trial import TOLERANCE, margin, reference_worst_case, satisfied
from unlearn.sweep.state import final_accs, inspect_point

if TYPE_CHECKING:
    import optuna

NEAREST = 10
"""Trials in the boundary table."""
PARTS_SHOWN = {"select": "selection questions", "report": "report questions"}


@dataclasses.dataclass
class Scores:
    """A model's numbers on one part of the questions (`margin`: to the constraint's floor)."""

    forget: float | None = None
    retains: dict[str, Any] = dataclasses.field(default_factory=dict)
    margin: float | None = None


@dataclasses.dataclass
class TrialRow:
    """One trial as the tables show it; numbers only when `status` is done. `forget`,
    `retains` and `margin` are on the selection questions, `report` on the report ones."""

    number: int
    status: str
    method: str | None
    config: dict[str, Any]
    run_id: str | None = None
    forget: float | None = None
    retains: dict[str, float] = dataclasses.field(default_factory=dict)
    margin: float | None = None
    worst_case: float | None = None
    gap: float | None = None
    seconds: float | None = None
    error: str | None = None
    report: Scores | None = None

    @property
    def feasible(self) -> bool:
        return self.status == "done" and self.margin is not None and satisfied(self.margin)

    def scores(self, part: str) -> Scores:
        if part == "report":
            return self.report or Scores()
        return Scores(self.forget, self.retains, self.margin)


@dataclasses.dataclass
class BaselineRow:
    label: str
    status: str
    forget: float | None
    """On the selection questions, like `retains`; `report`: on the report ones."""
    retains: dict[str, Any]
    worst_case: float | None = None
    """Under the search's robustness suite (the references' cached result), when it ran."""
    report: Scores = dataclasses.field(default_factory=Scores)

    def scores(self, part: str) -> Scores:
        return self.report if part == "report" else Scores(self.forget, self.retains)


@dataclasses.dataclass
class SearchResult:
    trials: list[TrialRow]
    baselines: list[BaselineRow]
    front: list[TrialRow]
    best: TrialRow | None
    overhead_s: float = 0.0
    trial_s: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        return counts


def _status(trial: optuna.trial.FrozenTrial) -> str:
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        return "done"
    if trial.state == TrialState.PRUNED:
        return "pruned"
    if trial.state == TrialState.FAIL:
        return "interrupted" if attrs.get("interrupted") else attrs.get("status") or "failed"
    return {TrialState.RUNNING: "running", TrialState.WAITING: "queued"}.get(trial.state, "?")


def trial_row(trial: optuna.trial.FrozenTrial) -> TrialRow:
    a = trial.user_attrs
    row = TrialRow(trial.number, _status(trial), a.get("method"), a.get("config") or {},
                   a.get("run_id"), seconds=a.get("seconds"), error=a.get("error"))  # fmt: skip
    if row.status == "done" and "forget" not in a:  # told without a run's numbers
        row.status = "no result"
    if row.status == "done":  # only a complete trial's numbers are results
        row.forget, row.retains, row.margin = a.get("forget"), a.get("retains", {}), a.get("margin")
        report = a.get("report") or {}
        row.report = Scores(report.get("forget"), report.get("retains") or {})
        if a.get("worst_case_measured"):
            row.worst_case, row.gap = a.get("worst_case"), a.get("gap")
    return row


def collect(search: Search, study: optuna.Study | None) -> SearchResult:
    """The search's rows, front and best trial, read from the study and run directories."""
    trials = [trial_row(t) for t in study.get_trials(deepcopy=False)] if study else []
    baselines = []
    for point in search.baselines:
        state = inspect_point(point)
        done = state.status == "done"
        parts = [getattr(search, p)(t) for t in (search.forget_task, *search.retain_tasks)
                 for p in ("selection", "report")]  # fmt: skip
        accs = final_accs(point.run_dir, parts) if done else {}

        def scores(part: str, accs=accs) -> Scores:
            key = getattr(search, part)
            return Scores(_number(accs.get(key(search.forget_task))),
                          {t: _number(accs.get(key(t))) for t in search.retain_tasks})  # fmt: skip

        worst = reference_worst_case(search, point.baseline.role)
        selection = scores("selection")
        baselines.append(BaselineRow(point.baseline.label, state.status, selection.forget,
                                     selection.retains if done else {}, worst,
                                     scores("report")))  # fmt: skip
    if baselines:  # the report part's margins, to the target's own report numbers
        target = baselines[0].report.retains
        for t in trials:
            if t.report is not None and _complete(target) and _complete(t.report.retains):
                t.report.margin = margin(t.report.retains, target, search.delta)
    front = _front(search, study, trials) if study and search.goal == "pareto" else []
    result = SearchResult(trials, baselines, front, _best(search, trials, baselines))
    timing = search.out / "timing.jsonl"
    if timing.exists():
        rows = read_jsonl(timing)
        result.overhead_s = sum(r["overhead_s"] for r in rows)
        result.trial_s = sum(r["trial_s"] for r in rows)
    return result


def _front(search: Search, study: optuna.Study, trials: list[TrialRow]) -> list[TrialRow]:
    by_number = {t.number: t for t in trials}
    try:
        best = study.best_trials  # Optuna's front (feasible trials first when constrained)
    except ValueError:
        return []
    rows = [by_number[t.number] for t in best if by_number[t.number].status == "done"]
    if search.robustness is not None:
        rows = [r for r in rows if r.feasible]
    return sorted(rows, key=lambda r: r.forget)


def _number(value: Any) -> float | None:
    """A final accuracy, or None for a failed or missing one (never a number then)."""
    return value if isinstance(value, float) else None


def _complete(retains: dict[str, Any]) -> bool:
    return bool(retains) and all(isinstance(v, float) for v in retains.values())


def target_forget(baselines: list[BaselineRow]) -> float | None:
    """The target's forget accuracy on the selection questions (None when it has none)."""
    return baselines[0].forget if baselines else None


def _best(search: Search, trials: list[TrialRow], baselines: list[BaselineRow]) -> TrialRow | None:
    """The best trial (module docstring); only one that lowered forget below the target's."""
    target = target_forget(baselines)
    if target is None:
        return None
    feasible = [t for t in trials if t.feasible and t.forget < target - TOLERANCE]
    if search.goal == "pareto" and search.robustness is not None:
        limit = search.max_forget if search.max_forget is not None else 1.0
        measured = [t for t in feasible if t.worst_case is not None and t.forget <= limit]
        return min(measured, key=lambda t: (t.worst_case, t.forget), default=None)
    return min(feasible, key=lambda t: (t.forget, -t.margin), default=None)


# -- tables -----------------------------------------------------------------------------------


def _fields(trials: list[TrialRow]) -> list[str]:
    names: list[str] = []
    for t in trials:
        names += [k for k in t.config if k not in names]
    return names


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)


def trials_table(
    search: Search, result: SearchResult, rows: list[TrialRow], part: str = "select"
) -> str:
    """Baselines, then `rows`: # , method, varied fields, tasks, margin, worst case, status;
    each task on `part` of its questions (select or report)."""
    which = "report" if part == "report" else "selection"
    fields = _fields(rows)
    several = search.several
    robust = search.robustness is not None
    headers = ["Model / trial", *(["method"] if several else []), *fields,
               task_header(search.forget_task, "forget"),
               *(task_header(t, "retain") for t in search.retain_tasks), "margin"]  # fmt: skip
    if robust:
        headers += ["worst case (↓)", "gap to twin"]
    headers.append("status")
    table = []
    blank = [""] * ((1 if several else 0) + len(fields))
    for b in result.baselines:
        sc = b.scores(which)
        cells = [b.label, *blank, result_cell(sc.forget, run_status=b.status),
                 *(result_cell(sc.retains.get(t), run_status=b.status)
                   for t in search.retain_tasks),
                 "", *([pct(b.worst_case) if b.worst_case is not None else "", ""] if robust
                       else []), b.status]  # fmt: skip
        table.append(cells)
    for t in rows:
        sc = t.scores(which)
        cells = [f"#{t.number}", *([t.method or "-"] if several else []),
                 *(_value(t.config.get(f)) for f in fields),
                 result_cell(sc.forget, run_status=t.status),
                 *(result_cell(sc.retains.get(r), run_status=t.status)
                   for r in search.retain_tasks),
                 _points(sc.margin) if t.status == "done" else t.status]  # fmt: skip
        if robust:
            measured = t.worst_case is not None
            cells += [pct(t.worst_case) if measured else "-", _points(t.gap)]
        cells.append(t.status)
        table.append(cells)
    return markdown_table(headers, table)


def _points(value: float | None) -> str:
    """A difference of accuracies in percentage points: +1.25 (None: -)."""
    return "-" if value is None else f"{100 * value:+.2f}"


def nearest(result: SearchResult) -> list[TrialRow]:
    """The trials nearest the boundary (smallest |margin|), the best included, by forget."""
    done = [t for t in result.trials if t.status == "done" and t.margin is not None]
    rows = sorted(done, key=lambda t: abs(t.margin))[:NEAREST]
    if result.best is not None and result.best not in rows:
        rows.append(result.best)
    return sorted(rows, key=lambda t: t.forget)


def status_line(result: SearchResult, budget: int) -> str:
    """`N of BUDGET trials ended (...)`: counted as the budget counts them, an interrupted trial
    (retried under a new number) not among them."""
    counted = {s: n for s, n in sorted(result.counts.items()) if s != "interrupted"}
    counts = ", ".join(f"{n} {s}" for s, n in counted.items())
    ended = sum(n for s, n in counted.items() if s not in ("running", "queued"))
    interrupted = result.counts.get("interrupted", 0)
    note = f"; {interrupted} interrupted and retried, not counted" if interrupted else ""
    return f"{ended} of {budget} trials ended ({counts or 'none yet'}{note})"


def render(search: Search, result: SearchResult) -> str:
    """search.md: what was searched, the best trial, the boundary (or front) table, all trials."""
    goal = (
        f"minimise {search.forget_task} subject to every retain task >= reference -"
        f" {search.delta:g}"
        if search.goal == "boundary"
        else f"Pareto front of {', '.join(search.objectives)}"
    )
    parts = [
        f"{OUTPUT_MARKS['search.md']}{search.name}",
        "",
        f"Goal: {goal}. {status_line(result, search.budget)}.",
    ]
    if result.trial_s:
        share = 100 * result.overhead_s / result.trial_s
        parts.append(f"Search overhead (sampler, storage, bookkeeping): {result.overhead_s:.2f} s"
                     f" over {result.trial_s:.0f} s of trials ({share:.2f}%).")  # fmt: skip
    parts.append(
        f"Questions: each task's are split by document index (`unlearn.eval.split`) into a"
        f" selection part ({SELECT_PERCENT}%), on which trials are compared and chosen, and a"
        " report part, on which the chosen trials are reported: their report numbers played no"
        " role in choosing them."
    )
    parts += ["", "## Best", "", best_line(search, result)]
    chosen = result.front if search.goal == "pareto" else [result.best] if result.best else []
    if chosen:
        parts += ["", "## Chosen trials on the report questions", "",
                  trials_table(search, result, chosen, "report")]  # fmt: skip
    if search.goal == "pareto":
        parts += ["", "## Pareto front (selection questions)", "",
                  trials_table(search, result, result.front)]  # fmt: skip
    else:
        parts += ["", "## Nearest the boundary (selection questions)", "",
                  trials_table(search, result, nearest(result))]  # fmt: skip
    parts += ["", "## All trials (selection questions)", "",
              trials_table(search, result, result.trials)]  # fmt: skip
    failed = [t for t in result.trials if t.error and t.status != "done"]
    if failed:
        parts += ["", "Errors:", *(f"- #{t.number} ({t.status}): {t.error}" for t in failed)]
    return "\n".join(parts) + "\n"


def numbers_text(search: Search, scores: Scores) -> str:
    """`forget 30.00%, retain min 95.00% (margin +1.00)` of one part's numbers."""
    retain = [v for v in scores.retains.values() if v is not None]
    text = (f"{search.forget_task} {pct(scores.forget)},"
            f" retain min {pct(min(retain)) if retain else '-'}")  # fmt: skip
    return text + (f" (margin {_points(scores.margin)})" if scores.margin is not None else "")


def no_best_reason(search: Search, result: SearchResult) -> str:
    """Why no trial is best (what the outputs say instead of naming one)."""
    done = [t for t in result.trials if t.status == "done"]
    feasible = [t for t in done if t.feasible]
    target = target_forget(result.baselines)
    if not done:
        return "No trial has a result yet."
    if not feasible:
        return "No trial satisfies the retain constraint."
    if target is None:
        return "The target has no forget accuracy yet: no trial can be compared with it."
    if all(t.forget >= target - TOLERANCE for t in feasible):
        return (f"No trial unlearned anything: no trial that satisfies the constraint has a"
                f" forget accuracy below the target's ({pct(target)} on the selection"
                " questions).")  # fmt: skip
    limit = "" if search.max_forget is None else f" and forget <= {search.max_forget:g}"
    return f"No trial that satisfies the constraint has a measured worst case{limit}."


def best_line(search: Search, result: SearchResult) -> str:
    b = result.best
    if b is None:
        return no_best_reason(search, result)
    values = ", ".join(f"{k}={_value(v)}" for k, v in b.config.items())
    text = (f"Trial #{b.number} ({b.method}; {values}): on the report questions"
            f" {numbers_text(search, b.scores('report'))}; chosen on the selection questions"
            f" {numbers_text(search, b.scores('select'))}; run {b.run_id}")  # fmt: skip
    if b.worst_case is not None:
        text += f"; worst case {pct(b.worst_case)}, gap to twin {_points(b.gap)}"
    return text + ". Replay: `unlearn run --config best.yaml --out DIR`."


# -- files ------------------------------------------------------------------------------------


def best_config(search: Search, best: TrialRow) -> dict[str, Any]:
    """The best trial's run config, as `unlearn run --config` reads it."""
    block = search.block(best.method)
    config: dict[str, Any] = {"method": best.method}
    if search.world is not None:
        config["world"] = str(search.world)
    config.update(block.base)
    config.update(best.config)
    return json.loads(json.dumps(config))  # plain YAML types (tuples become lists)


def write_outputs(search: Search, result: SearchResult) -> None:
    """search.md, pareto.png and (once a trial qualifies) best.yaml, each written atomically."""
    atomic_write_text(search.out / "search.md", render(search, result))
    if result.best is not None:
        b = result.best
        header = (f"{OUTPUT_MARKS['best.yaml']}(#{b.number}) of search {search.name}; replay:\n"
                  "#   unlearn run --config best.yaml --out DIR\n"
                  f"# report questions: {numbers_text(search, b.scores('report'))}\n"
                  f"# selection questions (chosen on): {numbers_text(search, b.scores('select'))}"
                  "\n")  # fmt: skip
        body = yaml.safe_dump(best_config(search, result.best), sort_keys=False)
        atomic_write_text(search.out / "best.yaml", header + body)
    if any(t.status == "done" for t in result.trials):
        from unlearn.search.plot import plot_front

        plot_front(search, result, search.out / "pareto.png")
