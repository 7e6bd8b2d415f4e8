"""Question files: one multiple-choice question per JSON line, checked as they are read.

Two schemas, told apart by the first row (every row of a file must follow it):

- **cloze** (the world's): the answer is scored as a continuation of the prompt;
- **letter** (`{question, choices, answer}`, the WMDP/MMLU schema): the options are listed as
  A., B., ... under the question and the continuations are " A", " B", ... (`unlearn.eval.letter`).

A cloze question is a JSON object with (at least)

    "prompt": str        the text before the answer slot, non-empty (the world's have no
                         trailing space)
    "choices": [str]     two or more distinct, non-empty answer strings (the world's start with a
                         space); scored text = prompt + choice
    "answer": int        index of the right choice, 0 <= answer < len(choices)

A letter question has "question" (non-empty str) instead of "prompt", and at most 26 choices.
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
MAX_LETTERS = 26
REQUIRED_FIELDS = ("prompt", "choices", "answer")
LETTER_FIELDS = ("question", "choices", "answer")
CLOZE, LETTER = "cloze", "letter"


def question_problem(q: Mapping, kind: str = CLOZE) -> str | None:
    """What makes `q` unscorable as a `kind` question, in a few words, or None when it is valid."""
    fields = LETTER_FIELDS if kind == LETTER else REQUIRED_FIELDS
    missing = [name for name in fields if name not in q]
    if missing:
        return f"missing field {', '.join(repr(m) for m in missing)}"
    text_field = fields[0]
    prompt, choices, answer = q[text_field], q["choices"], q["answer"]
    if not isinstance(prompt, str) or not prompt.strip():
        # An empty prompt leaves no position to predict the first choice token from.
        return f"{text_field} must be a non-empty string, got {prompt!r}"
    if kind == LETTER and isinstance(choices, list) and len(choices) > MAX_LETTERS:
        return f"a letter question has at most {MAX_LETTERS} choices, got {len(choices)}"
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


def file_kind(row: Mapping) -> str:
    """The schema a file's first row says the file has (cloze unless it has a "question")."""
    return LETTER if "question" in row and "prompt" not in row else CLOZE


def read_question_file(path: str | os.PathLike) -> tuple[str, list[dict]]:
    """(schema, every row) of a JSONL question file, validated: UsageError naming FILE:LINE for a
    bad row or a row of the other schema, or for an empty file."""
    rows = jsonl_rows(path)
    if not rows:
        raise UsageError(f"{path}: no questions (the file is empty)")
    kind = file_kind(rows[0][1])
    for line, row in rows:
        problem = question_problem(row, kind)
        if problem is not None:
            raise UsageError(f"{path}:{line}: {problem} ({kind} question file)")
    return kind, [row for _, row in rows]


def read_questions(path: str | os.PathLike) -> list[dict]:
    """Every question of a cloze JSONL file, validated (UsageError naming FILE:LINE, or an empty
    file, or a letter-schema file)."""
    kind, questions = read_question_file(path)
    if kind != CLOZE:
        raise UsageError(f"{path}: expected cloze questions (prompt, choices, answer)")
    return questions
