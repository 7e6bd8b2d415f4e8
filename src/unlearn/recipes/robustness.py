"""The robustness recipe: a model's worst case under a suite, beside the filtered twin's and the
original target's under the identical suite (`unlearn robustness`).

    cfg = RobustnessArgs(model_args=ModelArgs("/tmp/r1/model"), world="/tmp/w", out="/tmp/rb")
    report = run_robustness(cfg)          # OUT/robustness.json, also returned

The references (the twin and the target) are computed first, target first (its held-out
accuracy is the "original" that half-recovery steps are counted against), and cached per world
and suite in WORLD/robustness/ (or --cache): a second model on the same world reuses them. The
robustness gap of each model is its worst case minus the twin's.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn.config.settings import ModelArgs, check_seed
from unlearn.errors import UsageError
from unlearn.eval.suite import SuiteArgs
from unlearn.fsutil import atomic_write_json, check_writable_parent
from unlearn.models.refs import ModelRef, resolve_model
from unlearn.robustness.per_model import (
    SuiteInputs,
    check_probe_layers,
    evaluate_model,
    suite_inputs,
)
from unlearn.robustness.references import original_accuracy, reference_rows
from unlearn.robustness.score import gap
from unlearn.robustness.suite import SUITES, RobustnessSuite, load_suite
from unlearn.runs.cards import refresh_cards, saved_run
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RunDir, check_run_out
from unlearn.runs.store import check_store
from unlearn.tracking import TrackingArgs, for_group
from unlearn.world import World, load_world


@dataclass
class RobustnessArgs:
    """Options of `unlearn robustness`."""

    model_args: ModelArgs = field(default_factory=ModelArgs)
    """The model under test (--model, --revision, --trust_remote_code)."""
    out: str | None = None
    """Its robustness run directory: robustness.json, attacks/, probes/."""
    world: str | None = None
    """Mini world: attack corpora, questions, and the reference models (twin and target)."""
    suite: str = "quick"
    """quick, standard, searched, campaign, or a suite YAML file (docs/robustness.md)."""
    attack_budget: int | None = None
    """New fine-tuning attacks an Optuna search tries on each model after the suite's grid
    (default: the suite's own; `searched` has 8, the others 0)."""
    tasks: SuiteArgs = field(default_factory=SuiteArgs)
    """Tasks on the attack curves (--forget_tasks, --retain_tasks, ...); default on a world:
    forget_heldout and forget, and the retain tasks."""
    heldout_task: str | None = None
    """The forget task the worst case is measured on (default: forget_heldout on a world, else
    the first forget task)."""
    corpus: str | None = None
    """Without --world: forget-domain documents for the forget-data attacks and the probes."""
    benign_corpus: str | None = None
    """Without --world: benign documents (benign attacks, ablation's retain side, the lens)."""
    probe_questions: str | None = None
    """Without --world: a question file (answers known) that the linear and lens probes fit on."""
    references: bool = True
    """Also run the suite on the filtered twin and the original target (cached)."""
    filtered: str | None = None
    """The filtered twin (default: the world's); without one there is no robustness gap."""
    target: str | None = None
    """The original target (default: the world's)."""
    cache: str | None = None
    """Where the references' results are cached (default: WORLD/robustness)."""
    label: str | None = None
    """The model's label in robustness.json and the scorecard (default: --parent or OUT's name)."""
    parent: str | None = None
    """Run id of the model's unlearning run (links the scorecard row to it)."""
    run_id: str | None = None
    store: str | None = None
    eval_batch_size: int = 64
    seed: int = 0
    progress: bool = True
    tracking: TrackingArgs = field(default_factory=TrackingArgs)
    """Experiment trackers (--report_to, --project, --run_name, --group, --tags,
    --tracking_dir): the robustness run, its attacks and probes, and the references it runs,
    in one group (default: its run id)."""

    def __post_init__(self) -> None:
        if not self.model_args.model:
            raise UsageError("--model is required")
        if not self.out:
            raise UsageError("--out DIR is required")
        if self.eval_batch_size < 1:
            raise UsageError(f"--eval_batch_size must be >= 1, got {self.eval_batch_size}")
        check_seed(self.seed)
        self.resolved_suite()  # an unknown suite, a bad file or budget: one line, now

    def resolved_suite(self) -> RobustnessSuite:
        """The suite, with --attack_budget applied."""
        suite = load_suite(self.suite)
        if self.attack_budget is None:
            return suite
        return dataclasses.replace(suite, attack_budget=self.attack_budget)


def _same(a: ModelRef, b: ModelRef) -> bool:
    pa, pb = Path(a.name), Path(b.name)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return (a.name, a.revision) == (b.name, b.revision)


def reference_refs(args: RobustnessArgs, world: World | None) -> dict[str, ModelRef]:
    """{"target": ref, "filtered": ref} of the references that exist (none with
    --references false)."""
    if not args.references:
        return {}
    names = {"target": args.target or (world.target if world else None),
             "filtered": args.filtered or (world.filtered if world else None)}  # fmt: skip
    return {role: resolve_model(str(n)) for role, n in names.items() if n is not None}


def cache_dir(args: RobustnessArgs, world: World | None, inputs: SuiteInputs) -> Path:
    """WORLD/robustness/INPUTS-KEY (or --cache/...): keyed by everything besides the model that
    changes a result (`SuiteInputs.key`), so references are compared only like with like."""
    if args.cache:
        root = Path(args.cache)
    elif world is not None:
        root = world.root / "robustness"
    else:
        root = Path(args.out) / "references"
    return check_writable_parent(root / inputs.key())


def run_robustness(args: RobustnessArgs) -> dict[str, Any]:
    """Run the suite on the model (and the references), write OUT/robustness.json; returns it.
    Every input is checked before any weights load (UsageError)."""
    world = load_world(args.world) if args.world else None
    suite = args.resolved_suite()
    inputs = suite_inputs(suite, world, args.tasks, args.heldout_task, args.corpus,
                          args.benign_corpus, args.probe_questions, args.eval_batch_size,
                          args.seed, args.progress)  # fmt: skip
    ref = args.model_args.resolve(world)
    check_probe_layers(suite, ref)
    refs = reference_refs(args, world)
    if "filtered" in refs and _same(ref, refs["filtered"]):
        raise UsageError(
            "--model is the filtered twin, the suite's reference; give another model, or "
            "--references false to score the twin alone"
        )
    out = check_run_out(args.out, "robustness", {"input model": ref.name})
    if args.store:
        check_store(args.store)
    cache = cache_dir(args, world, inputs) if refs else None
    label = args.label or args.parent or out.name
    if label in refs:
        raise UsageError(f"--label {label} is a reference's label; give another --label")

    for rref in refs.values():
        check_probe_layers(suite, rref)
    run_id = args.run_id or f"robustness-{label}"
    if cache is not None and out in cache.parents and not RunDir(out).exists():
        # The references go inside OUT (no world to cache them in): OUT becomes this run's
        # directory first, so the model's own run finds it its own.
        RunDir(out).write_run(RunMeta(run_id, "robustness", status="pending",
                                      config={"label": label, "role": "model"}))  # fmt: skip
    tracking = for_group(args.tracking, run_id)  # the references: named by their own ids
    rows = reference_rows(inputs, refs, cache, args.store, tracking) if refs else {}
    rows[label] = evaluate_model(inputs, ref, label, "model", out, run_id, args.parent,
                                 args.store, original_accuracy(rows.get("target")),
                                 for_group(args.tracking, run_id, keep_name=True))  # fmt: skip
    report = write_report(out / "robustness.json", label, suite, inputs, rows)
    update_model_card(ref, report, out)
    return report


def card_summary(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """What a model card says of the model's row of robustness.json: the worst case (complete,
    or only a lower bound), what reached it, the gap to the filtered twin."""
    row = report["models"][report["model"]]
    keys = ("complete", "worst_case", "worst_case_lower_bound", "worst_attack", "gap_to_filtered",
            "status", "failed", "missing_families")  # fmt: skip
    summary = {k: row.get(k) for k in keys}
    summary["complete"] = bool(row.get("complete"))
    filtered = report["models"].get("filtered", {}).get("worst_case")
    return {"suite": report["suite"], "heldout_task": report["heldout_task"], **summary,
            "filtered_worst_case": filtered, "run": str(out)}  # fmt: skip


def update_model_card(ref: ModelRef, report: dict[str, Any], out: Path) -> None:
    """Put the worst case into the card of the model when it is a run's saved model (its
    stamp proves it); any other model (a hub id, a world model) has no card of ours."""
    run = saved_run(ref.name)
    if run is None:
        return
    for card in refresh_cards(run, robustness=card_summary(report, out)):
        print(f"updated the model card {card}", file=sys.stderr)


def write_report(
    path: Path,
    label: str,
    suite: RobustnessSuite,
    inputs: SuiteInputs,
    rows: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """robustness.json: {"model": LABEL, "suite", "heldout_task", "models": {label: row}} with
    each row's gap to the filtered twin (None unless both worst cases are complete: a partial
    one has no `worst_case`, only `worst_case_lower_bound`)."""
    twin = rows.get("filtered", {}).get("worst_case")
    models = {k: {**row, "gap_to_filtered": gap(row.get("worst_case"), twin)}
              for k, row in rows.items()}  # fmt: skip
    report = {"model": label, "suite": suite.name, "suite_key": suite.key(),
              "inputs_key": inputs.key(), "heldout_task": inputs.heldout,
              "retain_tasks": inputs.resolved.retain, "utility_margin": suite.utility_margin,
              "models": models}  # fmt: skip
    atomic_write_json(path, report)
    return report


__all__ = ["SUITES", "RobustnessArgs", "run_robustness"]
