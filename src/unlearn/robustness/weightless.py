"""The attacks of a robustness suite that change no stored weight: weight-only quantisation (the
suite's `quantize`, one row per scheme: quant-int8, quant-int4) and the latent-space
perturbation (`latent`). Each is a child run of kind `probe` (OUT/probes/NAME: run.json,
evals.jsonl with the attacked model's accuracy on the held-out task and on every retain task,
probe.json with those, the model's own and the attack's details), reused on a rerun when its
configuration is the same (the scheme and the torchao version, the latent settings and seed,
the tasks, the model, the dtype).

Both are scored against the model as it is (`base`: its held-out and retain accuracies,
computed once per suite run when any of these attacks has to run, kept in each probe.json)
under the suite's utility constraint (`score.weightless_row`), so a row shows what the attack
recovered and what it cost.

Memory: the latent attack runs on the loaded model (its hooks are gone when its evaluation
ends); each quantisation scheme loads its own copy, after the shared model is released, since
quantising replaces the weights in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from unlearn.eval.native import numeric_metrics
from unlearn.eval.suite import PreparedSuite, prepare_suite
from unlearn.fsutil import atomic_write_json
from unlearn.models.load import default_device, load_model, load_tokenizer
from unlearn.models.refs import ModelRef
from unlearn.robustness.attacks import LatentAttack
from unlearn.robustness.children import finished_run, run_error
from unlearn.robustness.inputs import PROBE_DTYPE, SuiteInputs
from unlearn.robustness.latent import add_to_block_outputs, latent_attack
from unlearn.robustness.quantize import SCHEMES, library_version, quantize_blocks
from unlearn.robustness.score import weightless_row
from unlearn.runs.lifecycle import run_lifecycle
from unlearn.runs.rows import RunMeta, utc_now
from unlearn.runs.rundir import check_run_out
from unlearn.tracking import TrackingArgs

QUANT_PREFIX = "quant-"


class _Session:
    """What the attacks of one suite run share, made when the first one needs it: the
    tokenizer, the prepared tasks, the model as loaded (released before a quantised copy
    loads) and its own scores."""

    def __init__(self, inputs: SuiteInputs, ref: ModelRef) -> None:
        self.inputs, self.ref = inputs, ref
        self._model: torch.nn.Module | None = None
        self._tokenizer = None
        self._prepared: PreparedSuite | None = None
        self._base: dict[str, Any] | None = None

    @property
    def keys(self) -> list[str]:
        return [self.inputs.heldout, *self.inputs.resolved.retain]

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.ref)
        return self._tokenizer

    def prepared(self) -> PreparedSuite:
        if self._prepared is None:
            self._prepared = prepare_suite(self.inputs.resolved)
        return self._prepared

    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = load_model(self.ref, PROBE_DTYPE, default_device())
        return self._model

    def release(self) -> None:
        self._model = None
        _free_memory()

    def score(self, model: torch.nn.Module, key: str) -> dict[str, float]:
        i = self.inputs
        result = self.prepared().score(model, self.tokenizer(), key, i.eval_batch_size, i.progress)
        return numeric_metrics(result)

    def base(self) -> dict[str, Any]:
        """{"heldout": acc, "retains": {task: acc}} of the model as it is (None: failed, with
        {"errors": {task: error}})."""
        if self._base is None:
            accs: dict[str, float | None] = {}
            errors: dict[str, str] = {}
            for key in self.keys:
                try:
                    accs[key] = self.score(self.model(), key).get("acc")
                except Exception as e:  # no number; the rows say why (`score.weightless_row`)
                    accs[key], errors[key] = None, f"{type(e).__name__}: {e}"
            retains = {t: accs[t] for t in self.inputs.resolved.retain}
            self._base = {"heldout": accs[self.inputs.heldout], "retains": retains}
            if errors:
                self._base["errors"] = errors
        return self._base

    def forget_texts(self) -> list[str]:
        """The forget-domain documents of the attack group (the forget fine-tuning attack's)."""
        if self.inputs.world is not None:
            return self.inputs.world.read_corpus("forget_attack")
        from unlearn.data import load_documents

        return load_documents(self.inputs.forget_corpus)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


Attack = Callable[[_Session], contextlib.AbstractContextManager]
"""attack(session) -> a context manager yielding (attacked model, JSON-able details)."""


def _latent(settings: LatentAttack) -> Attack:
    @contextlib.contextmanager
    def attack(session: _Session) -> Iterator[tuple[torch.nn.Module, dict]]:
        model = session.model()
        result = latent_attack(model, session.tokenizer(), session.forget_texts(), settings,
                               session.inputs.seed)  # fmt: skip
        with add_to_block_outputs(model, result.deltas):
            yield model, result.summary()

    return attack


def _quantized(scheme: str) -> Attack:
    @contextlib.contextmanager
    def attack(session: _Session) -> Iterator[tuple[torch.nn.Module, dict]]:
        session.release()
        model = load_model(session.ref, PROBE_DTYPE, default_device())
        try:
            yield model, quantize_blocks(model, scheme)
        finally:
            del model
            _free_memory()

    return attack


def _config(inputs: SuiteInputs, ref: ModelRef, name: str) -> dict[str, Any]:
    """A child run's configuration: a finished run is reused only when it is the same."""
    common = {"model": ref.name, "heldout_task": inputs.heldout,
              "retain_tasks": list(inputs.resolved.retain), "dtype": PROBE_DTYPE}  # fmt: skip
    latents = inputs.suite.latent_rows()
    if name in latents:
        settings = dataclasses.asdict(latents[name])
        return {"attack": "latent", "settings": settings, "seed": inputs.seed, **common}
    scheme = name.removeprefix(QUANT_PREFIX)
    definition = dataclasses.asdict(SCHEMES[scheme])
    return {"attack": "quantize", "scheme": scheme, "scheme_def": definition,
            "library": library_version(), **common}  # fmt: skip


def weightless_rows(
    inputs: SuiteInputs,
    ref: ModelRef,
    out: Path,
    run_id: str,
    store: str | Path | None = None,
    tracking: TrackingArgs | None = None,
) -> list[dict[str, Any]]:
    """The rows of the suite's quantisation and latent attacks on `ref` (in the suite's order),
    each run into OUT/probes/NAME unless it finished there with the same configuration."""
    suite = inputs.suite
    names = suite.weightless_names()
    if not names:
        return []
    latents = suite.latent_rows()
    session = _Session(inputs, ref)
    metas: dict[str, RunMeta] = {}
    try:
        # The latent attacks first: they use the loaded model, released before a quantised copy.
        for name in sorted(names, key=lambda n: n not in latents):
            run_dir = out / "probes" / name
            config = _config(inputs, ref, name)
            meta = finished_run(run_dir, config)
            if meta is None:
                attack = (
                    _latent(latents[name])
                    if name in latents
                    else _quantized(name[len(QUANT_PREFIX) :])
                )
                meta = _run(session, attack, run_dir, f"{run_id}-{name}", run_id, config, store,
                            tracking)  # fmt: skip
            metas[name] = meta
    finally:
        session.release()
    rows = []
    for name in names:
        run_dir, meta = out / "probes" / name, metas[name]
        result = None
        if (run_dir / "probe.json").is_file():
            result = json.loads((run_dir / "probe.json").read_text())
        kind = "latent" if name in latents else "quantize"
        rows.append(weightless_row(name, kind, meta.status, result, suite.utility_margin,
                                   run_error(run_dir, meta), f"{run_id}-{name}"))  # fmt: skip
    return rows


def _run(
    session: _Session,
    attack: Attack,
    run_dir: Path,
    child_id: str,
    parent: str,
    config: dict[str, Any],
    store: str | Path | None,
    tracking: TrackingArgs | None,
) -> RunMeta:
    run_dir = check_run_out(run_dir, "probe")
    (run_dir / "probe.json").unlink(missing_ok=True)
    base = session.base()
    fresh = RunMeta(id=child_id, kind="probe", config=config, status="running",
                    started=utc_now(), parent=parent, model_path=config["model"])  # fmt: skip
    heldout, retain = session.inputs.heldout, session.inputs.resolved.retain
    with (
        run_lifecycle(fresh, run_dir, store=store, tracking=tracking) as run,
        contextlib.ExitStack() as stack,
    ):
        try:
            model, details = stack.enter_context(attack(session))
            error = None
        except Exception as e:  # recorded as failed evaluations, as a failing probe is
            model, details, error = None, {}, f"{type(e).__name__}: {e}"
        accs: dict[str, float | None] = {}

        def score(key: str) -> tuple[dict, bool]:
            if model is None:
                raise RuntimeError(f"the attack failed: {error}")
            metrics = session.score(model, key)
            accs[key] = metrics.get("acc")
            return metrics, False  # a broken model is for the utility constraint to judge

        run.evaluate(0, session.keys, score)
        if error is None:
            atomic_write_json(run_dir / "probe.json", {
                **details, "acc": accs.get(heldout), "retains": {t: accs.get(t) for t in retain},
                "base": base,
            })  # fmt: skip
    return run.meta
