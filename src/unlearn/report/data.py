"""What a report reads of a store: the runs by kind, their final results, the roles of the tasks,
and the cell of each (run, task) under the one result-cell rule (`tables.result_cell`).

Design choices:
- A task's final result is its latest evaluated step. An accuracy task reads "acc"; a
  perplexity task (one with a "ppl" row: `general_ppl`, `ppl:PATH` tasks) reads "ppl", shown as
  a number ("3.42") under a "(↓)" header, never as a percentage.
- "retain" as one number is the minimum over the suite's retain tasks
  (`analysis.retain_aggregate`); with several retain tasks the tables add a "retain min (↑)"
  column after them. A run missing one of them has no aggregate: its word, or "-".
- Task roles come from the suites the runs recorded (run.json "suite"), in suite order; runs
  that recorded none (older run directories) get the world's for the tasks they measured.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn.report.analysis import Value, retain_aggregate
from unlearn.report.tables import (
    EVAL_FAILED,
    PPL,
    RETAIN_MIN_HEADER,
    pct,
    ppl_text,
    result_cell,
    task_header,
)
from unlearn.runs.rows import EvalRow
from unlearn.runs.store import Store, StoredRun

ACC = "acc"
BASELINE_ROLES = ("target", "checkpoint", "ignorant", "filtered")
"""Baseline rows come in this order of their config "role" (others after them)."""
WORLD_SUITE = {"forget": ["forget", "forget_heldout"], "retain": ["retain"], "other": []}
"""The roles of the world's tasks, for runs that recorded no suite (older run directories)."""
ROLE_ORDER = ("forget", "retain", "other")

Column = tuple[str, Callable[[StoredRun], str]]
"""A result column of a table: (header, the cell of a run)."""


@dataclass
class ReportData:
    """The store's runs, their final results and the tasks' roles, as the report reads them."""

    baselines: list[StoredRun]
    unlearn: list[StoredRun]
    attacks: list[StoredRun]
    final: dict[str, dict[str, dict[str, EvalRow]]]
    """run id -> task -> metric -> latest row."""
    roles: dict[str, str]
    """task -> forget, retain or other, from the suites the runs recorded, in suite order."""
    ppl: frozenset[str] = frozenset()
    """The perplexity tasks: those with a ppl row in some run."""
    robustness: list[StoredRun] = dataclasses.field(default_factory=list)
    """Robustness runs (one model under one suite); their attacks and probes are not in
    `attacks` (the scorecard shows them, `report.robustness`)."""

    @classmethod
    def load(cls, store: Store) -> ReportData:
        runs = store.runs()
        baselines = [r for r in runs if r.kind == "baseline"]
        final = {r.id: store.final_evals(r.id) for r in runs}
        roles: dict[str, str] = {}
        for r in runs:
            suite = r.config.get("suite") if isinstance(r.config.get("suite"), dict) else None
            for role in ROLE_ORDER:
                for task in (suite or WORLD_SUITE).get(role) or []:
                    # A run without an evaluation suite (an older run directory; a robustness
                    # or probe run, whose "suite" is a robustness suite's name) vouches only
                    # for the world tasks it measured: the world's roles must not add a
                    # `retain` task to a campaign that never had one.
                    if suite is not None or task in final[r.id]:
                        roles.setdefault(task, role)
        by_id = {r.id: r for r in runs}
        models = [r for r in runs if r.kind == "unlearn"] + baselines

        def attack_order(attack: StoredRun) -> tuple:
            # Attacks on baselines first (in role order), then on unlearned runs by method and
            # id: parallel workers finish in any order, the table should not change with it.
            parent = attacked_run(attack, by_id, models)
            if parent is not None and parent.kind == "baseline":
                return (0, role_rank(parent.config.get("role")), parent.id)
            return (1, (parent.method or "") if parent else "", attack.parent or "", attack.id)

        suites = {r.id for r in runs if r.kind == "robustness"}
        return cls(
            baselines=sorted(baselines, key=lambda b: role_rank(b.config.get("role"))),
            unlearn=[r for r in runs if r.kind == "unlearn"],
            attacks=sorted(
                (r for r in runs if r.kind == "attack" and r.parent not in suites),
                key=attack_order,
            ),
            final=final,
            roles=roles,
            ppl=frozenset(t for tasks in final.values() for t, m in tasks.items() if PPL in m),
            robustness=[r for r in runs if r.kind == "robustness"],
        )

    def tasks(self, runs: Sequence[StoredRun]) -> list[str]:
        """The tasks any of `runs` measured (an accuracy or a perplexity), in column order."""
        measured = {t for r in runs for t, m in self.final[r.id].items() if ACC in m or PPL in m}
        return ordered_tasks(measured, self.roles)

    def header(self, task: str) -> str:
        return task_header(task, self.roles.get(task), task in self.ppl)

    def first(self, role: str) -> str | None:
        """The suite's first task of a role (the world's `forget` / `retain`)."""
        return next((t for t, r in self.roles.items() if r == role), None)

    @property
    def retain_tasks(self) -> list[str]:
        """Every retain task of the runs' suites: the retain aggregate is their minimum."""
        return [t for t, r in self.roles.items() if r == "retain"]

    def target(self) -> StoredRun | None:
        roles = [b for b in self.baselines if b.config.get("role") == "target"]
        return (roles or self.baselines or [None])[0]

    def metric(self, task: str) -> str:
        return PPL if task in self.ppl else ACC

    def value(self, run: StoredRun, task: str) -> Value:
        """A run's final result on a task: its number, "eval failed", or None (not measured)."""
        row = self.final[run.id].get(task, {}).get(self.metric(task))
        if row is None:
            return None
        return EVAL_FAILED if row.status == "failed" else row.value

    def done_value(self, run: StoredRun, task: str) -> float | None:
        """A finished run's number on a task (its accuracy, or its ppl), or None when there is
        no trustworthy number."""
        value = self.value(run, task)
        return value if run.status == "done" and isinstance(value, float) else None

    def retain_value(self, run: StoredRun) -> float | None:
        """A finished run's retain aggregate (the minimum over the retain tasks), or None."""
        value = retain_aggregate([self.done_value(run, t) for t in self.retain_tasks])
        return value if isinstance(value, float) else None

    def cell(self, run: StoredRun, task: str) -> str:
        """The cell of one run and task: a percentage (a ppl: a number), or the word why not."""
        fmt = ppl_text if task in self.ppl else pct
        return result_cell(self.value(run, task), run_status=run.status, fmt=fmt)

    def retain_cell(self, run: StoredRun) -> str:
        values = [self.value(run, t) for t in self.retain_tasks]
        return result_cell(retain_aggregate(values), run_status=run.status)

    def columns(self, runs: Sequence[StoredRun]) -> list[Column]:
        """The result columns of a table of `runs`: each measured task, and the retain minimum
        right after the retain tasks when the suites have several."""
        tasks = self.tasks(runs)
        columns: list[Column] = []
        for task in tasks:
            columns.append((self.header(task), lambda r, t=task: self.cell(r, t)))
            if self.retain_min_after(task, tasks):
                columns.append((RETAIN_MIN_HEADER, self.retain_cell))
        return columns

    def retain_min_after(self, task: str, tasks: Sequence[str]) -> bool:
        """Whether the retain-min column goes after `task`: the last retain task shown, when the
        suites have more than one."""
        shown = [t for t in tasks if self.roles.get(t) == "retain"]
        return len(self.retain_tasks) > 1 and bool(shown) and task == shown[-1]


def model_owner(path: str, runs: Sequence[StoredRun]) -> StoredRun | None:
    """The one run of `runs` whose model is at `path`, else None.

    An attack given no --parent records the model path it was given, relative to wherever it
    ran, while a run records its model's absolute path: an absolute path must match exactly, a
    relative one matches the trailing parts of a run's model path (`run1/model` is the model of
    the run whose model is at `/x/run1/model`). Several matches name no run: a wrong name
    would be worse than the path.
    """
    wanted = Path(os.path.normpath(path))
    if ".." in wanted.parts:
        wanted = Path(os.path.abspath(wanted))
    found = []
    for r in runs:
        if not r.model_path:
            continue
        have = Path(os.path.normpath(r.model_path))
        if wanted.is_absolute():
            match = have == wanted
        else:
            match = have.parts[-len(wanted.parts) :] == wanted.parts
        if match and all(f.id != r.id for f in found):
            found.append(r)
    return found[0] if len(found) == 1 else None


def attacked_run(
    attack: StoredRun, by_id: dict[str, StoredRun], models: Sequence[StoredRun]
) -> StoredRun | None:
    """The run whose model `attack` attacked: its parent run, or the run of `models` whose
    model is at the path the attack recorded as its parent (`model_owner`)."""
    if not attack.parent:
        return None
    return by_id.get(attack.parent) or model_owner(attack.parent, models)


def role_rank(role: Any) -> int:
    return BASELINE_ROLES.index(role) if role in BASELINE_ROLES else len(BASELINE_ROLES)


def ordered_tasks(tasks: set[str], roles: dict[str, str] | None = None) -> list[str]:
    """Forget tasks, then retain, then the others, each in suite order; unknown ones last."""
    roles = roles or {}
    known = [t for role in ROLE_ORDER for t, r in roles.items() if r == role and t in tasks]
    return known + sorted(tasks - set(known))


def baseline_name(run: StoredRun) -> str:
    return str(run.config.get("name") or run.id)
