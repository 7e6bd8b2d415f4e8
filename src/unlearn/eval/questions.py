"""Question files: one multiple-choice cloze question per JSON line, checked as they are read.

A question is a JSON object with (at least)

    "prompt": str        the text before the answer slot, non-empty (the world's have no
                         trailing space)
    "choices": [str]     two or more distinct, non-empty answer strings (the world's start with a
                         space); scored text = prompt + choice
    "answer": int        index of the right choice, 0 <= answer < len(choices)

Other fields (id, domain, group, entity, relation) are metadata that scoring never reads. Any
number of choices from two up is scored the same way by both backends.

Design choice: every question file is checked whole when it is read - by `load_world` for all of
a world's tasks, and again by each evaluator - so a bad row is one line naming FILE:LINE (exit 2)
before any weights load, never a traceback after the model loaded or, worse, a number: Python's
negative indexing would turn `"answer": -1` into a valid-looking score of the last choice, and a
forget accuracy of 0.0 reads as perfect unlearning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from unlearn.errors import UsageError
from unlearn.fsutil import jsonl_rows

MIN_CHOICES = 2
REQUIRED_FIELDS = ("prompt", "choices", "answer")


def question_problem(q: Mapping) -> str | None:
    """What makes `q` unscorable, in a few words, or None when it is a valid question."""
    missing = [name for name in REQUIRED_FIELDS if name not in q]
    if missing:
        return f"missing field {', '.join(repr(m) for m in missing)}"
    prompt, choices, answer = q["prompt"], q["choices"], q["answer"]
    if not isinstance(prompt, str) or not prompt:
        # An empty prompt leaves no position to predict the first choice token from.
        return f"prompt must be a non-empty string, got {prompt!r}"
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        return f"choices must be a list of non-empty strings, got {choices!r}"
    if len(choices) < MIN_CHOICES:
        return f"a question needs at least {MIN_CHOICES} choices, got {len(choices)}"
    if len(set(choices)) != len(choices):
        # Two equal choices score the same, so "which one is right" has no answer.
        return f"choices are repeated: {choices!r}"
    if isinstance(answer, bool) or not isinstance(answer, int):
        return f"answer must be an integer index into choices, got {answer!r}"
    if not 0 <= answer < len(choices):
        last = len(choices) - 1
        return f"answer {answer} is not an index into its {len(choices)} choices (0..{last})"
    return None


def read_questions(path: str | os.PathLike) -> list[dict]:
    """Every question of a JSONL file, validated (UsageError naming FILE:LINE, or an empty file)."""
    questions = []
    for line, row in jsonl_rows(path):
        problem = question_problem(row)
        if problem is not None:
            raise UsageError(f"{path}:{line}: {problem}")
        questions.append(row)
    if not questions:
        raise UsageError(f"{path}: no questions (the file is empty)")
    return questions
