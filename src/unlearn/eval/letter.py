"""Letter multiple choice: `{question, choices, answer}` rows (the WMDP / MMLU schema) as prompts.

The prompt is lm-eval's MMLU / WMDP template, 0-shot and without a description line:

    <question, stripped>
    A. <choice 0>
    B. <choice 1>
    ...
    Answer:

and the continuations are " A", " B", ... (lm-eval's default target delimiter, a space, before
each letter). Both backends build the prompt with `letter_prompt`: the native evaluator scores
(prompt, " A") ... as requests, and the lm-eval task config (`letter_task_config`) calls the same
functions, so a local question file scores the same through either. Metrics: acc and
correct_prob (`unlearn.eval.tasks.utils.mcq_results`); acc_norm would equal acc here (every
continuation is one letter).
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

from unlearn.eval.tasks.utils import mcq_results

LETTERS = string.ascii_uppercase
TARGET_DELIMITER = " "
LETTER_METRICS = ("acc", "correct_prob")


def letter_prompt(doc: Mapping) -> str:
    """The question with its options listed as A., B., ... and "Answer:"."""
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(doc["choices"]))
    return f"{doc['question'].strip()}{options}\nAnswer:"


def letter_choices(doc: Mapping) -> list[str]:
    """The choice labels lm-eval scores: A, B, ... (one per option)."""
    return list(LETTERS[: len(doc["choices"])])


def as_cloze(rows: Sequence[Mapping]) -> list[dict]:
    """Letter rows as the native evaluator's questions: prompt + " A" ... " D"."""
    return [
        {
            "prompt": letter_prompt(row),
            "choices": [TARGET_DELIMITER + c for c in letter_choices(row)],
            "answer": int(row["answer"]),
        }
        for row in rows
    ]


def letter_task_config(task: str, questions_file: str | os.PathLike) -> dict:
    """Inline lm-eval config of a local letter question file (scored like the native path)."""
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(questions_file).absolute())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "num_fewshot": 0,
        "doc_to_text": letter_prompt,
        "doc_to_choice": letter_choices,
        "doc_to_target": "answer",
        "target_delimiter": TARGET_DELIMITER,
        "process_results": mcq_results,
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in LETTER_METRICS
        ],
        "metadata": {"version": 1},
    }
