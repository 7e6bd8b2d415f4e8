"""The baseline recipe: evaluate one model, untrained, with an evaluation suite, as a run.

    run_baseline("Target model (to unlearn)", ModelArgs("EleutherAI/deep-ignorance-unfiltered"),
                 SuiteArgs(forget_tasks=["wmdp_bio_robust"], retain_tasks=["mmlu"]),
                 out="runs/baseline-target", role="target", store="store.sqlite")

A baseline is a run of kind "baseline" (run.json with the label as config "name" and the role
that orders report rows; evals.jsonl at step 0), so the store, the report and sweep tables read
it like any run. Everything is checked (suite, model config, output directory) before the
weights load; a benchmark whose dataset is missing offline is bad input (exit 2).
"""

from __future__ import annotations

import os

from unlearn.config.settings import ModelArgs
from unlearn.eval.suite import SuiteArgs, prepare_suite, resolve_suite
from unlearn.models.load import default_device, load_model, load_tokenizer
from unlearn.runs.lifecycle import run_lifecycle
from unlearn.runs.rows import RunMeta, utc_now
from unlearn.runs.rundir import check_run_out
from unlearn.runs.store import check_store
from unlearn.tracking import TrackingArgs
from unlearn.world import load_world


def run_baseline(
    label: str,
    model_args: ModelArgs,
    suite_args: SuiteArgs,
    out: str | os.PathLike,
    role: str | None = None,
    world: str | os.PathLike | None = None,
    store: str | os.PathLike | None = None,
    batch_size: int = 64,
    run_id: str | None = None,
    tracking: TrackingArgs | None = None,
) -> RunMeta:
    """Evaluate the model on the suite as a baseline run at `out`; returns its final RunMeta
    (reported to the experiment trackers of `tracking`, if any)."""
    loaded = load_world(world) if world is not None else None
    suite = resolve_suite(suite_args, loaded)
    ref = model_args.resolve(loaded)
    path = check_run_out(out, "baseline", {"input model": ref.name})
    if store is not None:
        check_store(store)
    prepared = prepare_suite(suite)
    fresh = RunMeta(
        id=run_id or path.name,
        kind="baseline",
        status="running",
        started=utc_now(),
        model_path=ref.name,
        config={"name": label, "role": role, "model": ref.name, "revision": ref.revision,
                "suite": suite.roles()},
    )  # fmt: skip
    with run_lifecycle(fresh, path, store=store, tracking=tracking) as run:
        model, tokenizer = load_model(ref, device=default_device()), load_tokenizer(ref)
        score = prepared.scorer(model, tokenizer, batch_size)
        run.evaluate(0, suite.task_keys(), score, suite.metric)
    return run.meta
