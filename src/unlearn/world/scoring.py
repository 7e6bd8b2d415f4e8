"""The mini world's evaluation: its question sets and its perplexity tasks, scored natively.

The world knows its tasks and reads (and validates) their files; `unlearn.eval.native` and
`unlearn.eval.perplexity` are the generic scorers and know nothing of worlds. So this module calls
the evaluators, and the evaluators never import the world.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unlearn.eval.native import evaluate_questions
from unlearn.eval.perplexity import evaluate_perplexity, read_documents
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
    """Evaluate a model on the mini world's tasks: {task: metrics} (first `limit` questions or
    documents of each). Default: every question set of WORLD_TASKS the world has, then its
    perplexity tasks (`general_ppl`: {"ppl", "nll", "tokens", "n"}, no accuracy). An unknown
    task is a KeyError before anything is scored. Of the world only `questions` ({task: question
    file}) and `perplexity` ({task: document file}) are read."""
    # A world-like object without `perplexity` (a test's stand-in) has no perplexity task.
    perplexity = dict(getattr(world, "perplexity", None) or {})
    if not tasks:
        tasks = [t for t in WORLD_TASKS if t in world.questions] + list(perplexity)
    tasks = list(tasks)
    for task in tasks:
        if task not in world.questions and task not in perplexity:
            known = sorted([*world.questions, *perplexity])
            raise KeyError(f"world has no task {task!r} (has {known})")
    results = {}
    for task in tasks:
        if task in perplexity:
            texts = read_documents(perplexity[task])[:limit]
            results[task] = evaluate_perplexity(
                model, tokenizer, texts, batch_size, progress, desc=task
            )
            continue
        questions = read_questions(world.questions[task])[:limit]
        results[task] = evaluate_questions(
            model, tokenizer, questions, batch_size, progress, desc=task
        )
    return results
