"""A robustness suite attached to other work: a sweep spec's `robustness:` block (and a search's
trials), run on each finished unlearning run's model.

    robustness: quick                       # a built-in suite, on the spec's world
    robustness: my_suite.yaml               # a suite file (relative to the spec)
    robustness:                             # or a mapping
      suite: standard                       # name, file, or an inline suite mapping
      references: true                      # also the twin and target (cached per world)
      corpus: bio.jsonl                     # without a world: the RobustnessArgs inputs
      benign_corpus: wiki.jsonl
      probe_questions: bio_train.jsonl
      heldout_task: heldout.jsonl

Everything is checked when the spec is read, before anything runs (`robustness.inputs`: probe
questions or a corpus holding the held-out answers are refused here too). The references are
computed by the first point that needs them and shared through the cache
(`robustness.references`, WORLD/robustness/INPUTS-KEY).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn.errors import UsageError
from unlearn.eval.suite import SuiteArgs
from unlearn.models.refs import resolve_model
from unlearn.robustness.inputs import SuiteInputs, suite_inputs
from unlearn.robustness.per_model import evaluate_model
from unlearn.robustness.references import cached_reference, original_accuracy, reference_rows
from unlearn.robustness.suite import load_suite, suite_from_dict
from unlearn.tracking import TrackingArgs
from unlearn.world import World

PLAN_KEYS = ("suite", "references", "corpus", "benign_corpus", "probe_questions", "heldout_task",
             "cache")  # fmt: skip


@dataclass(frozen=True)
class RobustnessPlan:
    """A suite with its inputs and references, ready to run on any model of the spec."""

    inputs: SuiteInputs
    references: dict[str, str] = field(default_factory=dict)
    """role -> model path of the references (empty: none)."""
    cache: str | None = None

    def run(
        self,
        model: str,
        label: str,
        out: Path,
        parent: str | None,
        store,
        tracking: TrackingArgs | None = None,
    ) -> str:
        """The suite on `model` into `out` (a robustness run dir); returns its status.
        `tracking` (a sweep's or search's, grouped) reports its runs."""
        refs = {role: resolve_model(path) for role, path in self.references.items()}
        rows = reference_rows(self.inputs, refs, Path(self.cache), store, tracking) if refs else {}
        row = evaluate_model(self.inputs, resolve_model(model), label, "model", out,
                             f"{label}-robustness", parent, store,
                             original_accuracy(rows.get("target")), tracking)  # fmt: skip
        return row["status"]

    def reference_worst_case(self, role: str) -> float | None:
        """A reference's worst case from the cache: None before it ran, or when its result is
        partial or was computed on other inputs or weights (never a stale or partial number)."""
        if self.cache is None or role not in self.references:
            return None
        ref = resolve_model(self.references[role])
        row = cached_reference(Path(self.cache), role, self.inputs, ref)
        return None if row is None else row.get("worst_case")


def _local(value: Any, here: Path) -> Any:
    if (
        isinstance(value, str)
        and value
        and not Path(value).is_absolute()
        and (here / value).exists()
    ):
        return str(here / value)
    return value


def plan_from_spec(
    value: Any, here: Path, world: World | None, tasks: SuiteArgs
) -> RobustnessPlan | None:
    """The `robustness:` block (None when absent or false); UsageError on anything wrong."""
    if value is None or value is False:
        return None
    block = {"suite": value} if isinstance(value, str) else value
    if not isinstance(block, dict):
        raise UsageError("robustness: must be a suite name, a suite file or a mapping")
    unknown = sorted(set(block) - set(PLAN_KEYS))
    if unknown:
        raise UsageError(f"robustness: unknown key(s) {unknown} (allowed: {', '.join(PLAN_KEYS)})")
    spec = block.get("suite", "quick")
    if isinstance(spec, dict):
        suite = suite_from_dict(spec, "robustness: suite")
    elif isinstance(spec, str):
        suite = load_suite(_local(spec, here) if spec.endswith((".yaml", ".yml")) else spec)
    else:
        raise UsageError("robustness: suite must be a name, a file or a mapping")
    paths = {k: _local(block.get(k), here) for k in ("corpus", "benign_corpus", "probe_questions")}
    inputs = suite_inputs(suite, world, tasks, block.get("heldout_task"), paths["corpus"],
                          paths["benign_corpus"], paths["probe_questions"],
                          progress=False)  # fmt: skip
    refs: dict[str, str] = {}
    cache = None
    if block.get("references", True) and world is not None:
        refs = {"target": str(world.target), "filtered": str(world.filtered)}
        cache = str(Path(block.get("cache") or world.root / "robustness") / inputs.key())
    return RobustnessPlan(inputs, refs, cache)
