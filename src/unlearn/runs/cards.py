"""The model cards of a run's saved models: OUT/model/README.md and OUT/adapter/README.md, from
what the run directory records (run.json, evals.jsonl) and, once a robustness suite has been
run on the model, its worst case.

    card_files(meta)                    # the card saved with the model ({README.md: text})
    write_cards(out)                    # rewrite it once the results exist
    write_cards(out, robustness=summary)
    saved_run(Path("OUT/model"))        # OUT: the run directory that saved this model

Design choices:
- The card is written twice: with the model (`ActiveRun.save_model` puts it among the saved
  directory's files, so a saved directory never lacks one, even if the process dies before the
  evaluation) and when the run ends (the lifecycle), when the status and results are known.
- Only what the tool wrote is replaced: a card is rewritten only inside a directory the run's
  stamp (`rundir.OWNER_FILE`) proves the run saved, and only when it is absent or a card this
  tool wrote for this run (`models.card.card_run`); a README of the user's is left alone.
- The robustness summary lives in the card's own header, so rewriting the card keeps it; a new
  save of the model starts without one (the new weights have not been attacked).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from unlearn.errors import UsageError
from unlearn.fsutil import atomic_write_text
from unlearn.models.card import (
    CARD_FILE,
    CardFacts,
    CardResult,
    card_run,
    is_hub_id,
    read_card_meta,
    render_card,
)
from unlearn.runs.rows import EvalRow, RunMeta
from unlearn.runs.rundir import SAVED_DIRS, RunDir

DATA_FIELDS = {"forget_corpus": "forget", "retain_corpus": "retain", "retain_mix": "retain mix",
               "corpus": "training corpus"}  # fmt: skip
"""Config fields naming training data, and the role each names."""


def base_model(meta: RunMeta) -> tuple[str | None, str | None]:
    """(model, revision) the run started from: --model (an attack's, an unlearning run's),
    a distillation's teacher, or the world's target that an unlearning run defaults to."""
    config = meta.config
    name = config.get("model") or config.get("teacher")
    if name is None and config.get("world"):
        from unlearn.world import load_world  # heavy, and only a world default needs it

        try:
            name = str(load_world(config["world"]).target)
        except UsageError:  # the world moved since: say where it was
            name = f"the target of the world {config['world']}"
    elif name and RunDir(name).exists():  # a teacher given as its run directory
        name = str(Path(name) / "model")
    return (None if name is None else str(name)), config.get("revision")


def training_data(meta: RunMeta) -> dict[str, str]:
    """{role: corpus} of the data the run trained on (world defaults named as such)."""
    config, data = meta.config, {}
    for key, role in DATA_FIELDS.items():
        if config.get(key):
            data[role] = str(config[key])
    if meta.kind == "attack" and "training corpus" not in data:
        # An attack's config does not record --world; without --corpus it trained on a world.
        names = config.get("world_corpora") or ["forget_attack"]
        data["training corpus"] = "the world's " + ", ".join(names)
    if config.get("world"):
        if meta.kind == "unlearn" and meta.method == "distill":
            data.setdefault("training corpus", "the world's retain corpora")
        elif meta.kind == "unlearn":
            data.setdefault("forget", "the world's forget_unlearn corpus")
            data.setdefault("retain", "the world's retain corpora")
        data["world"] = str(config["world"])
    return data


def hub_datasets(data: dict[str, str]) -> list[str]:
    """The hub dataset ids among `data`'s corpora (ID[:CONFIG[:SPLIT]] specs)."""
    from unlearn.data.corpus import CorpusSpec

    found = []
    for spec in data.values():
        try:
            parsed = CorpusSpec.parse(spec)
        except UsageError:
            continue
        if not parsed.is_local and is_hub_id(parsed.source) and parsed.source not in found:
            found.append(parsed.source)
    return found


def final_results(meta: RunMeta, evals: list[EvalRow]) -> tuple[int | None, list[CardResult]]:
    """The step of the last evaluation (the saved model's) and its rows, with their roles."""
    if not evals:
        return None, []
    step = max(e.step for e in evals)
    suite = meta.config.get("suite")
    roles = {}
    if isinstance(suite, dict):
        roles = {t: role for role, tasks in suite.items() if isinstance(tasks, list) for t in tasks}
    rows = [CardResult(e.task, e.metric, e.value, e.stderr, e.error, roles.get(e.task))
            for e in evals if e.step == step]  # fmt: skip
    return step, rows


def card_facts(
    meta: RunMeta,
    evals: list[EvalRow],
    saved: str,
    robustness: dict[str, Any] | None = None,
    run_dir: Path | None = None,
) -> CardFacts:
    """What the card of the run's saved directory `saved` ("model" or "adapter") says."""
    name, revision = base_model(meta)
    data = training_data(meta)
    step, results = final_results(meta, evals)
    return CardFacts(
        run_id=meta.id, kind=meta.kind, status=meta.status, base_model=name, revision=revision,
        method=meta.method, config=meta.config, data=data, datasets=hub_datasets(data),
        step=step, results=results, final=meta.final, robustness=robustness,
        adapter=saved == "adapter", parent=meta.parent,
        run_dir=str(run_dir) if run_dir is not None else None,
    )  # fmt: skip


def card_files(meta: RunMeta, run_dir: Path | None = None) -> dict[str, str]:
    """The card saved with the model, before any result exists: {README.md: text} ({} with a
    note when it cannot be written: a card never costs a trained model its save)."""
    try:
        return {CARD_FILE: render_card(card_facts(meta, [], "model", run_dir=run_dir))}
    except Exception as e:  # any failure: the model matters more than its card
        print(f"note: the model of {meta.id} is saved without a model card: {e}", file=sys.stderr)
        return {}


def write_cards(run_path: str | Path, robustness: dict[str, Any] | None = None) -> list[Path]:
    """(Re)write the card of each directory the run in `run_path` saved; returns the cards
    written. `robustness` replaces the cards' robustness summary (default: each keeps its own).
    A directory the run did not save, or a README the tool did not write for this run, is
    skipped with a note."""
    run = RunDir(run_path)
    saved_dirs = [(name, run.path / name) for name in SAVED_DIRS if (run.path / name).is_dir()]
    if not saved_dirs:  # most runs (a suite's attacks) save nothing: read nothing
        return []
    record = run.read()
    written = []
    for name, saved in saved_dirs:
        card = saved / CARD_FILE
        if not run.owns(saved) or (card.exists() and card_run(card) != record.meta.id):
            print(f"note: {card} left as it is (not a card unlearn wrote for run "
                  f"{record.meta.id})", file=sys.stderr)  # fmt: skip
            continue
        keep = (read_card_meta(card) or {}).get("robustness")
        facts = card_facts(record.meta, record.evals, name, robustness or keep, run.path)
        atomic_write_text(card, render_card(facts))
        written.append(card)
    return written


def refresh_cards(run_path: str | Path, robustness: dict[str, Any] | None = None) -> list[Path]:
    """`write_cards` after a run or a robustness suite: a card that cannot be written is a note
    on stderr, never a change to how the run ended (its model and results are already safe)."""
    try:
        return write_cards(run_path, robustness)
    except Exception as e:  # any failure: the run's outcome comes first (see the docstring)
        print(f"note: the model card of {run_path} was not updated: {e}", file=sys.stderr)
        return []


def saved_run(model: str | Path) -> Path | None:
    """The run directory whose saved model (or adapter) `model` is, proven by its stamp; None
    for any other model (a hub id, a world model, a copy)."""
    path = Path(model).expanduser()
    if path.name not in SAVED_DIRS or not path.is_dir():
        return None
    run = RunDir(path.resolve().parent)
    return run.path if run.exists() and run.owns(path) else None
