"""The mini world's evaluation: its question sets scored by the native evaluator.

The world knows its tasks and reads (and validates) their question files; `unlearn.eval.native`
is the generic scorer and knows nothing of worlds. So this module calls the evaluator, and the
evaluator never imports the world.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unlearn.eval.native import evaluate_questions
from unlearn.eval.questions import read_questions
from unlearn.world.load import World

WORLD_TASKS = (
    "forget",
    "forget_heldout",
    "forget_attack",
    "retain",
    "retain_late",
    "near_domain",
)
"""Every world's question sets, in the order tables show them."""


def evaluate_world(
    model: torch.nn.Module,
    tokenizer,
    world: World,
    tasks: Sequence[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    limit: int | None = None,
) -> dict[str, dict]:
    """Evaluate a model on the mini world's question sets: {task: metrics} (first `limit`
    questions of each). An unknown task is a KeyError before anything is scored. Of the world
    only `questions` ({task: question file}) is read."""
    tasks = list(tasks or WORLD_TASKS)
    for task in tasks:
        if task not in world.questions:
            raise KeyError(f"world has no task {task!r} (has {sorted(world.questions)})")
    results = {}
    for task in tasks:
        questions = read_questions(world.questions[task])[:limit]
        results[task] = evaluate_questions(
            model, tokenizer, questions, batch_size, progress, desc=task
        )
    return results
