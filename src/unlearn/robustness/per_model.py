"""One model under one robustness suite: its fine-tuning attacks (normal attack runs), its
probes (runs of kind `probe`), and the summary (a run of kind `robustness` whose evaluation
rows are each attack's and probe's worst case and the overall worst case).

    inputs = suite_inputs(load_suite("quick"), world=world)       # checked, nothing loaded
    row = evaluate_model(inputs, model_ref, "lens-1a2b", "model", out, run_id, store=path)

Layout of OUT (a robustness run directory):

    OUT/run.json, evals.jsonl       the summary run (kind robustness)
    OUT/attacks/NAME/               one attack run per suite attack (kind attack, evals.jsonl)
    OUT/probes/NAME/                one probe run per suite probe (kind probe, probe.json),
                                    and per quantisation scheme and latent attack (`weightless`)
    OUT/result.json                 this model's row of robustness.json

Rerunning skips each attack and probe that finished with the same configuration, so a killed
suite loses only what was in flight; children of another suite are removed first (they are runs
of ours, under our run directory), and all of them when the recorded inputs key or the model's
weights identity differs (`SuiteInputs.result_key`).

A suite with a failed attack or probe is partial: the run ends failed, its overall `worst_case`
row is a failed row, and the highest number seen is recorded as `worst_case_lower_bound`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from unlearn.errors import UsageError
from unlearn.eval.letter import as_cloze
from unlearn.eval.questions import LETTER, read_question_file
from unlearn.fsutil import atomic_write_json
from unlearn.models.load import default_device, load_model, load_tokenizer
from unlearn.models.refs import ModelRef, model_num_layers
from unlearn.readouts.fitting import general_texts
from unlearn.recipes.attack import StartScores, build_attack_config, run_attack
from unlearn.robustness.attack_search import searched_rows
from unlearn.robustness.children import finished_run as _finished
from unlearn.robustness.children import run_error as _error
from unlearn.robustness.inputs import SuiteInputs, suite_inputs  # noqa: F401 (re-exported)
from unlearn.robustness.probes import ProbeData, ProbeOptions, run_probe
from unlearn.robustness.score import (
    CurvePoint,
    attack_row,
    curve_point,
    model_score,
    probe_row,
    trial_name,
)
from unlearn.robustness.suite import FinetuneAttack, RobustnessSuite
from unlearn.robustness.weightless import weightless_rows
from unlearn.runs.lifecycle import run_lifecycle
from unlearn.runs.rows import RunMeta, utc_now
from unlearn.runs.rundir import RunDir, check_run_out
from unlearn.tracking import TrackingArgs, for_group
from unlearn.world.generate import PATHOGEN_RELATIONS


def check_probe_layers(suite: RobustnessSuite, ref: ModelRef) -> None:
    """UsageError for a probe or latent-attack layer outside the model's blocks (from its
    config, no weights)."""
    checks = []
    if suite.probe_layers is not None and {"linear", "lens"} & set(suite.probes):
        checks.append(("probe_layers", suite.probe_layers))
    if suite.latent is not None and suite.latent.layers is not None:
        checks.append(("latent layers", suite.latent.layers))
    if not checks:
        return
    n = model_num_layers(ref)
    for what, layers in checks:
        bad = [layer for layer in layers if not 0 <= layer < n]
        if bad:
            raise UsageError(f"{what} {bad} outside the model's blocks 0..{n - 1}")


def probe_data(inputs: SuiteInputs) -> ProbeData:
    """The probes' questions and texts: on a world, the attack group's facts (each asked with
    every paraphrase prompt of its relation: three training rows per fact, since the tiny
    world has 48 attack questions), the held-out questions, the attack group's documents, the
    retain documents and general text."""
    world = inputs.world
    test_task = inputs.resolved.task(inputs.heldout)
    if world is not None:
        prompts = {r.name: r.prompts for r in PATHOGEN_RELATIONS}
        train = [
            {**q, "prompt": p.format(e=q["entity"])}
            for q in world.read_questions("forget_attack")
            for p in prompts.get(q["relation"], (None,))
            if p is not None
        ]
        test = world.read_questions(inputs.heldout)[: test_task.limit]
        return ProbeData(train, test, world.read_corpus("forget_attack"),
                         world.read_corpus("retain"), general_texts(world))  # fmt: skip
    from unlearn.data import load_documents

    if test_task.path is None:
        raise ValueError(f"probes need a question file as the held-out task, not {test_task.key}")
    kind, rows = read_question_file(test_task.path)
    test = as_cloze(rows) if kind == LETTER else rows
    train: list[dict] = []
    if inputs.probe_questions:
        kind, rows = read_question_file(inputs.probe_questions)
        train = as_cloze(rows) if kind == LETTER else rows
    benign = load_documents(inputs.benign_corpus) if inputs.benign_corpus else []
    forget = load_documents(inputs.forget_corpus) if inputs.forget_corpus else []
    return ProbeData(train, test[: test_task.limit], forget, benign, benign)


def _curve(run_dir: Path, inputs: SuiteInputs) -> list[CurvePoint]:
    by_step: dict[int, dict[str, float | None]] = {}
    for e in RunDir(run_dir).read().evals:
        if e.metric == "acc":
            by_step.setdefault(e.step, {})[e.task] = e.value if e.status == "done" else None
    return [curve_point(step, values, inputs.heldout, inputs.resolved.retain, inputs.unlearned)
            for step, values in sorted(by_step.items())]  # fmt: skip


def _recorded_key(out: Path) -> dict[str, Any] | None:
    """The result key the robustness run in `out` recorded (None: none there)."""
    if not RunDir(out).exists():
        return None
    try:
        config = RunDir(out).read_meta().config
    except UsageError:
        return None
    return {k: config.get(k) for k in ("inputs_key", "model_key")}


def _remove_stale(out: Path, suite: RobustnessSuite, keep_none: bool = False) -> None:
    """Remove our children that are not this suite's (all of them with `keep_none`: they ran
    on other inputs or other weights, and an attack's config names its corpus by path and its
    model by name only, so they would be taken as finished)."""
    trials = {trial_name(i) for i in range(suite.attack_budget)}  # the attack search's
    keep = {"attacks": {a.name for a in suite.attacks} | trials,
            "probes": {*suite.probes, *suite.weightless_names()}}  # fmt: skip
    for sub, names in keep.items():
        folder = out / sub
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            if (keep_none or child.name not in names) and RunDir(child).exists():
                shutil.rmtree(child)  # a run of ours from another suite or other inputs


def evaluate_model(
    inputs: SuiteInputs,
    ref: ModelRef,
    label: str,
    role: str,
    out: str | Path,
    run_id: str,
    parent: str | None = None,
    store: str | Path | None = None,
    original: float | None = None,
    tracking: TrackingArgs | None = None,
) -> dict[str, Any]:
    """Run the suite on `ref` into the robustness run directory `out`; returns the model's row
    (`result.json`). `original` is the original target's held-out accuracy (half recovery).
    `tracking` reports the robustness run, and its attacks and probes in its group."""
    suite = inputs.suite
    check_probe_layers(suite, ref)
    out = check_run_out(out, "robustness", {"input model": ref.name})
    key = inputs.result_key(ref)
    recorded = _recorded_key(out)
    config = {"label": label, "role": role, "model": ref.name, "suite": suite.name,
              "suite_key": suite.key(), "suite_def": suite.to_dict(),
              "heldout_task": inputs.heldout, "retain_tasks": inputs.resolved.retain,
              **key}  # fmt: skip
    fresh = RunMeta(id=run_id, kind="robustness", config=config, status="running",
                    started=utc_now(), parent=parent, model_path=ref.name)  # fmt: skip
    children = for_group(tracking, run_id) if tracking is not None else None
    with run_lifecycle(fresh, out, store=store, tracking=tracking) as run:
        _remove_stale(out, suite, keep_none=recorded is not None and recorded != key)
        attacks, start = [], StartScores()
        for attack in suite.attacks:
            row = _attack(inputs, attack, ref, out, run_id, store, original, children, start)
            if original is None and role == "target" and row["curve"] and row["status"] != "failed":
                # The target is the original: its own step 0 is what the others recover to.
                original = row["curve"][0]["heldout"]
                row = _attack(inputs, attack, ref, out, run_id, store, original)  # finished
            attacks.append(row)
        if suite.attack_budget:

            def trial(attack: FinetuneAttack) -> dict[str, Any]:
                return _attack(inputs, attack, ref, out, run_id, store, original, children, start)

            attacks += searched_rows(suite.attacks, attacks, suite.attack_budget, inputs.seed,
                                     trial, suite.attack_space, _log)  # fmt: skip
        attacks += weightless_rows(inputs, ref, out, run_id, store, children)
        probes = _probes(inputs, ref, out, run_id, store, children)
        score = model_score(attacks, probes)
        result = {"label": label, "role": role, "model": ref.name, "run_id": run_id,
                  "heldout_task": inputs.heldout, "retain_tasks": inputs.resolved.retain,
                  "suite_key": suite.key(), **key, **score, "attacks": attacks,
                  "probes": probes}  # fmt: skip

        def summary(name: str) -> tuple[dict, bool]:
            row = next((r for r in (*attacks, *probes) if r["name"] == name), None)
            value = score["worst_case"] if row is None else row["worst_case"]
            if value is None and row is None and score["worst_case_lower_bound"] is not None:
                missing = ", ".join(score["missing_families"])
                bound = 100 * score["worst_case_lower_bound"]
                raise RuntimeError(
                    f"incomplete suite (no result from {missing}): only a lower bound, {bound:.2f}%"
                )
            if value is None:
                raise RuntimeError((row or {}).get("error") or "no attack or probe has a result")
            if row is None and score["steps_to_half"] is not None:
                return {"worst_case": value, "steps_to_half": score["steps_to_half"]}, False
            return {"worst_case": value}, False

        names = [r["name"] for r in (*attacks, *probes)]
        run.evaluate(0, [*names, inputs.heldout], summary, lambda _k: "worst_case")
        if not score["complete"] and score["worst_case_lower_bound"] is not None:
            # Its own metric, so no reader takes it for the worst case (the report shows it
            # as ">= X (partial)").
            bound = {"worst_case_lower_bound": score["worst_case_lower_bound"]}
            run.evaluate(0, [inputs.heldout], lambda _k: (bound, False))
        atomic_write_json(out / "result.json", result)
    return {**result, "status": run.meta.status}


def _attack(
    inputs: SuiteInputs,
    attack: FinetuneAttack,
    ref: ModelRef,
    out: Path,
    run_id: str,
    store: str | Path | None,
    original: float | None,
    tracking: TrackingArgs | None = None,
    start: StartScores | None = None,
) -> dict[str, Any]:
    run_dir = out / "attacks" / attack.name
    child_id = f"{run_id}-{attack.name}"
    cfg = build_attack_config({
        **inputs.attack_overrides(attack), "model": ref.name, "revision": ref.revision,
        "trust_remote_code": ref.trust_remote_code, "out": str(run_dir), "parent": run_id,
        "run_id": child_id, "store": str(store) if store else None,
    }, f"attack {attack.name}")  # fmt: skip
    meta = _finished(run_dir, cfg.to_dict())
    if meta is None:
        if tracking is not None:  # operational: not in the config compared just above
            cfg.args.tracking = tracking
        meta = run_attack(cfg, start)
    margin = inputs.suite.utility_margin
    return attack_row(attack.name, attack.family, meta.status, _curve(run_dir, inputs), margin,
                      original, _error(run_dir, meta), child_id)  # fmt: skip


def _probes(
    inputs: SuiteInputs,
    ref: ModelRef,
    out: Path,
    run_id: str,
    store: str | Path | None,
    tracking: TrackingArgs | None = None,
) -> list[dict[str, Any]]:
    suite = inputs.suite
    opts = ProbeOptions(suite.probe_layers, suite.in_context_k, suite.lens_steps, inputs.seed)
    rows, loaded = [], None
    for name in suite.probes:
        run_dir = out / "probes" / name
        child_id = f"{run_id}-{name}"
        config = {"probe": name, "model": ref.name, "options": opts.__dict__,
                  "heldout_task": inputs.heldout}  # fmt: skip
        meta = _finished(run_dir, config)
        if meta is None:
            if loaded is None:
                data = probe_data(inputs)
                loaded = (load_model(ref, device=default_device()), load_tokenizer(ref), data)
            meta = _run_probe(name, loaded, opts, inputs, run_dir, child_id, run_id, config, store,
                              tracking)  # fmt: skip
        result = None
        if (run_dir / "probe.json").is_file():
            result = json.loads((run_dir / "probe.json").read_text())
        rows.append(probe_row(name, meta.status, result, _error(run_dir, meta), child_id))
    return rows


def _run_probe(
    name: str,
    loaded: tuple,
    opts: ProbeOptions,
    inputs: SuiteInputs,
    run_dir: Path,
    child_id: str,
    parent: str,
    config: dict,
    store: str | Path | None,
    tracking: TrackingArgs | None = None,
) -> RunMeta:
    model, tokenizer, data = loaded
    run_dir = check_run_out(run_dir, "probe")
    (run_dir / "probe.json").unlink(missing_ok=True)
    fresh = RunMeta(id=child_id, kind="probe", config=config, status="running",
                    started=utc_now(), parent=parent, model_path=config["model"])  # fmt: skip
    with run_lifecycle(fresh, run_dir, store=store, tracking=tracking) as run:

        def score(_key: str) -> tuple[dict, bool]:
            result = run_probe(name, model, tokenizer, data, opts, inputs.eval_batch_size,
                               inputs.progress)  # fmt: skip
            atomic_write_json(run_dir / "probe.json", result)
            metrics = {"acc": result["acc"]}
            if result.get("layer") is not None:
                metrics["layer"] = result["layer"]
            for layer, acc in (result.get("per_layer") or {}).items():
                metrics[f"acc_L{layer}"] = acc
            return metrics, False

        run.evaluate(0, [inputs.heldout], score)
    return run.meta


def cached_result(out: Path, inputs: SuiteInputs, ref: ModelRef) -> dict[str, Any] | None:
    """The row a finished, complete robustness run in `out` holds for these inputs and this
    model's weights, else None (missing, running, failed or partial, another suite, held-out
    task, corpus or model: it is then run again)."""
    meta = _finished(out)
    if meta is None or meta.status != "done" or not (out / "result.json").is_file():
        return None
    expected = {"suite_key": inputs.suite.key(), "model": ref.name, **inputs.result_key(ref)}
    if any(meta.config.get(k) != v for k, v in expected.items()):
        return None
    try:
        row = json.loads((out / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if row.get("complete") is not True or row.get("inputs_key") != inputs.key():
        return None
    return {**row, "status": meta.status}


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
