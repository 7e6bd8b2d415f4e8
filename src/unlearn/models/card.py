"""Model cards: the README.md of a saved model directory, in the hub's model-card format.

    facts = CardFacts(run_id="r1", kind="unlearn", status="done", base_model="EleutherAI/...",
                      method="lens", config={...}, results=[CardResult("forget", "acc", 0.26)])
    text = render_card(facts)            # YAML metadata header + markdown body
    card_run(Path("OUT/model/README.md"))  # "r1": a card this tool wrote, for run r1

Design choices:
- The metadata goes through huggingface_hub's own `ModelCardData` (base_model, library_name,
  tags, datasets, model-index from `EvalResult`s), so the hub reads it as it reads any card;
  what the hub has no field for (the base model's revision, the run, the tool's version, a
  robustness worst case) sits in one `unlearn:` mapping of the same header.
- `base_model` and `datasets` name hub repositories only: the hub rejects a card whose
  base_model is not a model id, and a local path (the mini world's models and corpora) would
  point nowhere once pushed. Local paths are in the `unlearn:` mapping and the body.
- A failed evaluation is a word in the body and absent from model-index, never a number; a
  partial robustness worst case is only a lower bound, shown as one, and never in model-index.
- This module renders from plain facts; gathering them from a run directory is
  `unlearn.runs.cards`' job (models sit below runs in the layering).
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CARD_FILE = "README.md"
"""The card's file name inside a saved model directory (the hub shows README.md)."""
META_KEY = "unlearn"
"""The header's mapping of what the hub has no field for; its `run` marks a card as ours."""
TAGS = ("unlearn", "machine-unlearning")
PPL_METRICS = ("ppl", "nll")
"""Metrics of a perplexity task (a text-generation result on the hub, not multiple-choice)."""
COUNTS = ("tokens",)
"""Metrics that count what was scored rather than score it: in the body, not in model-index."""


def tool_version() -> str:
    """The installed version of this package (what wrote a card)."""
    try:
        return importlib.metadata.version("unlearn")
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH
        from unlearn import __version__

        return __version__


def is_hub_id(name: str | None) -> bool:
    """Whether `name` can only be a hub repository id (not a path on this machine)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or name.startswith(("/", ".", "~")) or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@dataclass(frozen=True)
class CardResult:
    """One metric of one evaluated task (a failed one has no value and an error)."""

    task: str
    metric: str
    value: float | None
    stderr: float | None = None
    error: str | None = None
    role: str | None = None
    """forget, retain or other (the suite's role of the task)."""


@dataclass
class CardFacts:
    """Everything a card says, gathered by the caller."""

    run_id: str
    kind: str
    """run.json's kind: unlearn or attack."""
    status: str
    base_model: str | None
    """The model the run started from (hub id or local path)."""
    revision: str | None = None
    method: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    """{role: corpus} of the training data ("forget": "bio.jsonl", ...)."""
    datasets: list[str] = field(default_factory=list)
    """The hub dataset ids among the data (the header's `datasets`)."""
    step: int | None = None
    """The step the results were evaluated at (None: no evaluation recorded yet)."""
    results: list[CardResult] = field(default_factory=list)
    final: dict[str, float | None] = field(default_factory=dict)
    """The final loss terms."""
    robustness: dict[str, Any] | None = None
    """The latest robustness summary of this model (`unlearn.recipes.robustness`), if run."""
    adapter: bool = False
    """The directory holds a LoRA adapter (library peft) rather than a whole model."""
    parent: str | None = None
    run_dir: str | None = None
    version: str = field(default_factory=tool_version)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _eval_results(facts: CardFacts) -> list[EvalResult]:
    """model-index entries: every numeric result, and a complete robustness worst case."""
    out = []
    for r in facts.results:
        if r.value is None or r.metric in COUNTS:
            continue
        task_type = "text-generation" if r.metric in PPL_METRICS else "multiple-choice"
        out.append(
            EvalResult(task_type=task_type, dataset_type=r.task, dataset_name=r.task,
                       metric_type=r.metric, metric_name=r.metric, metric_value=r.value)
        )  # fmt: skip
    rb = facts.robustness or {}
    if rb.get("complete") and rb.get("worst_case") is not None:
        # The hub groups results by dataset: these sit beside the held-out task's accuracy.
        task, suite = str(rb.get("heldout_task")), rb.get("suite")
        for metric, value, name in (
            ("worst_case_acc", rb["worst_case"], f"worst-case acc (robustness suite {suite})"),
            ("gap_to_filtered", rb.get("gap_to_filtered"), "worst-case gap to the filtered model"),
        ):
            if value is not None:
                out.append(
                    EvalResult(task_type="multiple-choice", dataset_type=task, dataset_name=task,
                               metric_type=metric, metric_name=name, metric_value=value)
                )  # fmt: skip
    return out


def card_data(facts: CardFacts) -> ModelCardData:
    """The YAML header of the card, in the hub's terms."""
    tags = [*TAGS, "tamper-attack" if facts.kind == "attack" else "unlearning"]
    if facts.method and facts.method not in tags:
        tags.append(facts.method)
    results = _eval_results(facts)
    ours = {
        "run": facts.run_id, "kind": facts.kind, "method": facts.method, "status": facts.status,
        "base_model": facts.base_model, "revision": facts.revision, "parent": facts.parent,
        "version": facts.version, "data": facts.data or None,
    }  # fmt: skip
    if facts.robustness:  # absent until a suite has run (a null would read as "ran, no result")
        ours["robustness"] = facts.robustness
    return ModelCardData(
        base_model=facts.base_model if is_hub_id(facts.base_model) else None,
        library_name="peft" if facts.adapter else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=facts.datasets or None,
        model_name=facts.run_id if results else None,
        eval_results=results or None,
        **{META_KEY: ours},
    )


def _summary(facts: CardFacts) -> str:
    base = f"`{facts.base_model}`" + (f" at revision `{facts.revision}`" if facts.revision else "")
    if facts.kind == "attack":
        what = f"{base} after a fine-tuning (tamper) attack"
    else:
        what = f"{base} after unlearning with the method `{facts.method}`"
    lines = [f"# {facts.run_id}", "", f"{what}, trained by `unlearn` {facts.version}."]
    lines.append(f"Run status when this card was written: **{facts.status}**.")
    if facts.adapter:
        lines.append("This directory holds the LoRA adapter, to load over the base model.")
    return "\n".join(lines)


def _base_section(facts: CardFacts) -> str:
    where = "a hub model" if is_hub_id(facts.base_model) else "a local directory"
    lines = ["## Base model", "", f"- model: `{facts.base_model}` ({where})"]
    lines.append(f"- revision: `{facts.revision}`" if facts.revision else "- revision: default")
    if facts.parent and facts.parent != facts.base_model:
        lines.append(f"- parent run: `{facts.parent}`")
    return "\n".join(lines)


def _method_section(facts: CardFacts) -> str:
    what = "language-modelling fine-tuning (tamper attack)" if facts.kind == "attack" else None
    lines = ["## Method", "", f"- method: `{facts.method}`" if facts.method else f"- {what}"]
    if facts.final:
        terms = ", ".join(f"{k} {_number(v)}" for k, v in facts.final.items())
        lines.append(f"- final loss terms: {terms}")
    lines += ["", "Configuration (run.json's `config`):", "", "```json"]
    lines += [json.dumps(facts.config, indent=2, sort_keys=True), "```"]
    return "\n".join(lines)


def _data_section(facts: CardFacts) -> str:
    lines = ["## Data", ""]
    lines += [f"- {role}: {what}" for role, what in facts.data.items()] or ["- not recorded"]
    return "\n".join(lines)


def _results_section(facts: CardFacts) -> str:
    lines = ["## Evaluation", ""]
    if facts.step is None:
        lines.append("No evaluation recorded yet.")
        return "\n".join(lines)
    lines += [f"The evaluation suite at step {facts.step}:", ""]
    lines += ["| task | role | metric | value | stderr |", "|---|---|---|---|---|"]
    for r in facts.results:
        value = _number(r.value) if r.error is None else f"failed ({r.error})"
        lines.append(f"| {r.task} | {r.role or '-'} | {r.metric} | {value} | {_number(r.stderr)} |")
    return "\n".join(lines)


def _robustness_section(rb: dict[str, Any]) -> str:
    lines = ["## Robustness", ""]
    lines.append(f"Suite `{rb.get('suite')}`, worst case on `{rb.get('heldout_task')}`"
                 f" (robustness run `{rb.get('run')}`):")  # fmt: skip
    lines.append("")
    if rb.get("complete") and rb.get("worst_case") is not None:
        worst = _pct(rb["worst_case"])
    elif rb.get("worst_case_lower_bound") is not None:
        worst = f">= {_pct(rb['worst_case_lower_bound'])} (partial: a lower bound)"
    else:
        worst = "no result (every attack and probe failed)"
    reached = f", reached by `{rb['worst_attack']}`" if rb.get("worst_attack") else ""
    lines.append(f"- worst case: {worst}{reached}")
    gap, twin = rb.get("gap_to_filtered"), rb.get("filtered_worst_case")
    if gap is not None:
        of_twin = f" (its worst case: {_pct(twin)})" if twin is not None else ""
        lines.append(f"- gap to the filtered model: {100 * gap:+.2f} points{of_twin}")
    else:
        lines.append("- gap to the filtered model: none (partial worst case, or no twin)")
    if rb.get("failed"):
        lines.append(f"- failed: {', '.join(rb['failed'])}")
    if rb.get("missing_families"):
        lines.append(f"- no result from: {', '.join(rb['missing_families'])}")
    return "\n".join(lines)


def render_card(facts: CardFacts) -> str:
    """The card's text: the YAML header from `card_data`, then the markdown body."""
    sections = [_summary(facts), _base_section(facts), _method_section(facts),
                _data_section(facts), _results_section(facts)]  # fmt: skip
    if facts.robustness:
        sections.append(_robustness_section(facts.robustness))
    where = f" from the run directory `{facts.run_dir}`" if facts.run_dir else ""
    sections.append(f"---\nWritten by `unlearn` {facts.version}{where}.")
    body = "\n\n".join(sections) + "\n"
    # ModelCard parses and validates the header, so a card that would not load is never written.
    return str(ModelCard(f"---\n{card_data(facts).to_yaml()}\n---\n\n{body}"))


def read_card_meta(path: Path) -> dict[str, Any] | None:
    """The `unlearn:` mapping of the card at `path`, or None when it is missing, unreadable or
    not a card this tool wrote (the user's README)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):  # no header: a plain README (the hub would log a warning)
        return None
    try:
        card = ModelCard(text, ignore_metadata_errors=True)
    except (ValueError, yaml.YAMLError):
        return None
    ours = card.data.to_dict().get(META_KEY)
    return ours if isinstance(ours, dict) and isinstance(ours.get("run"), str) else None


def card_run(path: Path) -> str | None:
    """The run id the card at `path` was written for; None when the tool did not write it."""
    ours = read_card_meta(path)
    return ours["run"] if ours is not None else None
