"""Per-document scoring for the bundled lm-eval tasks (their `process_results` functions).

lm-eval hands a `multiple_choice` task's `process_results` the (log-likelihood, is-greedy) pair of
each choice's continuation, in choice order. From those we report, per document:

- `acc`: the highest log-likelihood is the right answer (first index wins a tie, like
  `numpy.argmax` in lm-eval's own scoring and `max` in the native evaluator);
- `acc_norm` (cloze tasks only): the same on log-likelihood per character of the choice string,
  lm-eval's length normalisation;
- `correct_prob`: the softmax over the choices' log-likelihoods, taken at the right answer. This
  is the reference campaign's "cloze correct prob": it moves smoothly while accuracy sits at a
  plateau, and its chance level is 1/len(choices).

Every metric is aggregated with `mean` in the YAMLs, so lm-eval's stderr is the sample standard
error, as in the native evaluator. The gold answer is the document's integer `answer` field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def correct_prob(logliks: Sequence[float], answer: int) -> float:
    """Softmax of `logliks` at index `answer` (computed stably around the max)."""
    top = max(logliks)
    weights = [math.exp(x - top) for x in logliks]
    return weights[answer] / sum(weights)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one wins a tie."""
    return max(range(len(values)), key=lambda i: values[i])


def per_character(logliks: Sequence[float], choices: Sequence[str]) -> list[float]:
    """Log-likelihood per character of each choice string (lm-eval's `acc_norm`)."""
    return [ll / max(len(c), 1) for ll, c in zip(logliks, choices, strict=True)]


def _logliks(results) -> list[float]:
    return [float(ll) for ll, _greedy in results]


def mcq_results(doc: dict, results) -> dict[str, float]:
    """Letter multiple choice: `acc` and `correct_prob` (the choices are the letters)."""
    logliks, answer = _logliks(results), int(doc["answer"])
    return {
        "acc": float(argmax(logliks) == answer),
        "correct_prob": correct_prob(logliks, answer),
    }


def cloze_results(doc: dict, results) -> dict[str, float]:
    """Cloze over the answer strings in `doc["choices"]`: `acc`, `acc_norm`, `correct_prob`."""
    logliks, answer = _logliks(results), int(doc["answer"])
    return {
        "acc": float(argmax(logliks) == answer),
        "acc_norm": float(argmax(per_character(logliks, doc["choices"])) == answer),
        "correct_prob": correct_prob(logliks, answer),
    }
