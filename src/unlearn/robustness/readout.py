"""Hidden-state read-outs shared by the white-box probes (`unlearn.robustness.probes`).

Design choices:

- "Layer l" is the output of block l, read with `unlearn.readouts.hooks` (never HF's
  `hidden_states`), so a probe at layer l reads what a lens or affine map at layer l is fitted on.
- A question's prompt is tokenized exactly as the native cloze scorer tokenizes its context
  (`unlearn.eval.native.encode_requests`, no special tokens as for the world's tasks, trailing
  whitespace moved to the continuation, the last `context_window` tokens kept), so the last
  position read here is the position the scorer reads the answer's first token from.
- Batches are right-padded and every read is at a real token: with a causal mask and right
  padding, padding after a position never changes it, so a padded row's last real position
  holds the same numbers as the row run alone (a test checks this).
- Forwards stop after the deepest requested block (`hooks.forward_hiddens`): a probe of the
  lower layers never pays for the upper ones or for the unembedding.
- The linear probe has two read-outs (`linear_readout` picks one from the questions' choices):
  `answers`, one class per answer string read at the prompt's last token, where the train
  answers name every test choice (the world's closed answer sets, the letters of multiple
  choice); `statements` otherwise (each question with its own answer): a binary classifier
  tells the right choice from the wrong ones by the block output at the last token of the
  prompt followed by that choice, centred on its question's mean. The classifiers are
  scikit-learn's (no hand-written optimisation); the layer is chosen by cross-validation on
  the train questions, grouped by fact so that a fact's choices and paraphrases never straddle
  a split (`fact_folds`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from unlearn.data.batching import collate, tokenize_examples
from unlearn.eval.encoding import encode_requests
from unlearn.eval.native import context_window
from unlearn.readouts.fitting import FIT_MAX_LENGTH
from unlearn.readouts.hooks import forward_hiddens, num_layers


def check_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """The sorted layers to probe: `layers`, or every block when None (ValueError naming the
    model's range for a layer outside it, or for an empty selection)."""
    n = num_layers(model)
    if layers is None:
        return list(range(n))
    bad = sorted({layer for layer in layers if not 0 <= layer < n})
    if bad:
        raise ValueError(f"probe layers {bad} outside the model's blocks 0..{n - 1}")
    if not layers:
        raise ValueError(f"no probe layers given (the model has blocks 0..{n - 1})")
    return sorted(set(layers))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def prompt_ids(model: nn.Module, tokenizer, questions: Sequence[dict]) -> list[list[int]]:
    """Each question's context tokens, as the native scorer feeds them (module docstring)."""
    if not questions:
        raise ValueError("no questions to read hidden states for")
    pairs = encode_requests(tokenizer, [(q["prompt"], q["choices"][0]) for q in questions])
    window = context_window(model, tokenizer)
    return [ctx[-window:] for ctx, _ in pairs]


def statement_ids(model: nn.Module, tokenizer, questions: Sequence[dict]) -> list[list[int]]:
    """The context followed by each choice's continuation tokens, question by question and
    choice by choice, split as the scorer splits them and keeping the last `context_window`."""
    if not questions:
        raise ValueError("no questions to read hidden states for")
    requests = [(q["prompt"], c) for q in questions for c in q["choices"]]
    window = context_window(model, tokenizer)
    return [(ctx + cont)[-window:] for ctx, cont in encode_requests(tokenizer, requests)]


def first_tokens(tokenizer, question: dict) -> list[int]:
    """The first token of each choice as a continuation of the question's prompt (the token
    the scorer reads at the prompt's last position)."""
    pairs = encode_requests(tokenizer, [(question["prompt"], c) for c in question["choices"]])
    return [cont[0] for _, cont in pairs]


@torch.no_grad()
def _last_hiddens(
    model: nn.Module,
    ids: Sequence[list[int]],
    pad: int,
    layers: Sequence[int],
    batch_size: int,
    progress: bool,
) -> dict[int, Tensor]:
    """{layer: [len(ids), hidden] float32 CPU tensor}: each block output at the last token of
    each sequence, in order. Sequences are sorted by length before batching (little padding)
    and put back in order."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = _device(model)
    parts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="hidden states", disable=not progress, leave=False):
        rows = order[start : start + batch_size]
        batch = collate([ids[i] for i in rows], pad).to(device)
        hiddens = forward_hiddens(model, batch.input_ids, batch.attention_mask, layers)
        last = batch.attention_mask.sum(dim=1) - 1  # right padding: the last real token
        at = torch.arange(len(rows), device=device)
        for layer in layers:
            parts[layer].append(hiddens[layer][at, last].float().cpu())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {layer: torch.cat(chunks)[inverse] for layer, chunks in parts.items()}


def last_token_hiddens(
    model: nn.Module,
    tokenizer,
    questions: Sequence[dict],
    layers: Sequence[int],
    batch_size: int = 64,
    progress: bool = False,
) -> dict[int, Tensor]:
    """{layer: [len(questions), hidden] float32 CPU tensor}: each block output at the last
    token of each question's prompt, in question order."""
    ids = prompt_ids(model, tokenizer, questions)
    return _last_hiddens(model, ids, _pad_id(tokenizer), layers, batch_size, progress)


def statement_hiddens(
    model: nn.Module,
    tokenizer,
    questions: Sequence[dict],
    layers: Sequence[int],
    batch_size: int = 64,
    progress: bool = False,
) -> dict[int, Tensor]:
    """{layer: [total choices, hidden] float32 CPU tensor}: each block output at the last token
    of each question's prompt followed by each of its choices (`statement_ids` order)."""
    ids = statement_ids(model, tokenizer, questions)
    return _last_hiddens(model, ids, _pad_id(tokenizer), layers, batch_size, progress)


@torch.no_grad()
def mean_hiddens(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 64,
) -> dict[int, Tensor]:
    """{layer: [hidden] float64 CPU tensor}: the mean block output over every non-pad token of
    `texts` (each truncated like the fitting helpers' text, and to the context window).

    A token mean, not a mean of per-document means: long documents count by their tokens, as
    every masked loss of the project counts them.
    """
    max_length = min(FIT_MAX_LENGTH, context_window(model, tokenizer))
    examples = tokenize_examples(texts, tokenizer, max_length)
    if not examples:
        raise ValueError("no non-empty texts to average hidden states over")
    device, pad = _device(model), _pad_id(tokenizer)
    sums: dict[int, Tensor] = {}
    count = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad).to(device)
        hiddens = forward_hiddens(model, batch.input_ids, batch.attention_mask, layers)
        mask = batch.attention_mask.to(torch.float64)[..., None]
        for layer in layers:
            total = (hiddens[layer].to(torch.float64) * mask).sum(dim=(0, 1)).cpu()
            sums[layer] = sums[layer] + total if layer in sums else total
        count += int(batch.attention_mask.sum())
    return {layer: total / count for layer, total in sums.items()}


def tie_credit(scores: Sequence[float], answer: int) -> float:
    """1 if the right answer alone scores highest, 1/k if it ties with k-1 others at the top
    (the expected accuracy of breaking the tie at random), else 0.

    A read-out that cannot tell choices apart (two choices with the same first token under the
    lens, or choices a classifier never saw) then earns chance credit for them, never a full
    point by the accident of which choice is listed first.
    """
    top = max(scores)
    tied = [i for i, s in enumerate(scores) if s == top]
    return 1.0 / len(tied) if answer in tied else 0.0


# ---- linear read-outs (the `linear` probe's classifiers) -----------------------------------

LINEAR_C = 1.0
"""Inverse L2 strength of the linear probe (sklearn's default) on standardised features."""
LINEAR_TOL = 1e-3
"""lbfgs's stopping tolerance for the linear probe's fits (sklearn's default is 1e-4). Measured
on the default world's quick suite: 1e-3 takes 2.5-4x fewer iterations, and the probe's
per-layer accuracies move by at most 4 of 240 questions (one standard error is about 8), with
the same layer chosen; at 1e-4 the 36 fits of one model took 17-25 s, a third of `quick`."""
LINEAR_FOLDS = 5
"""Cross-validation folds (grouped by fact) that choose the linear probe's layer."""
SMALL_FIT = 1 << 24
"""A classifier fit with fewer (rows x features x classes) than this runs single-threaded: on
small problems BLAS threads spend more time waiting for each other than computing (the tiny
world's fits, 144 x 64 x 32, ran 25 times slower with two threads on two busy cores)."""


def answer_text(q: dict) -> str:
    """The right answer's string without its leading space: an `answers` class label."""
    return q["choices"][int(q["answer"])].strip()


def fact_key(q: dict) -> str:
    """Cross-validation group: the fact (entity, relation) when the row names it, else the
    prompt. The paraphrases of one fact share a key, so a fold never holds out a fact whose
    other phrasings it trained on (which would reward memorising entities, not reading
    knowledge)."""
    if "entity" in q and "relation" in q:
        return f"{q['entity']}\x00{q['relation']}"
    return q["prompt"]


def fact_folds(train: Sequence[dict], seed: int) -> list[tuple[list[int], list[int]]]:
    """(fit, held-out) question indices of each cross-validation fold, grouped by fact."""
    from sklearn.model_selection import GroupKFold

    groups = [fact_key(q) for q in train]
    folds = min(LINEAR_FOLDS, len(set(groups)))
    if folds < 2:
        raise ValueError("the linear probe needs train questions about at least 2 facts")
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(list(a), list(b)) for a, b in splitter.split(np.zeros(len(train)), groups=groups)]


def _countable(folds: Sequence[tuple[list[int], list[int]]], train: Sequence[dict]) -> list:
    """Per fold, the held-out questions whose answer the fold's classes include (`answers`)."""
    labels = [answer_text(q) for q in train]
    out = []
    for fit_rows, held_rows in folds:
        seen = {labels[i] for i in fit_rows}
        out.append([i for i in held_rows if labels[i] in seen])
    return out


def linear_readout(train: Sequence[dict], test: Sequence[dict], seed: int) -> str:
    """`answers` when every choice of every test question is the answer of a train question
    and the train answers repeat across facts (the classifier can name every choice, and its
    layer can be cross-validated); else `statements`, which needs neither.

    Both are decided from the choices and the train answers only, never from the test
    answers, as an adversary without them would decide.
    """
    known = {answer_text(q) for q in train}
    if not all(c.strip() in known for q in test for c in q["choices"]):
        return "statements"
    counted = _countable(fact_folds(train, seed), train)
    return "answers" if any(counted) else "statements"


def _fit(x: np.ndarray, labels: Sequence, seed: int, balanced: bool) -> Any:
    """StandardScaler + logistic regression from `x` [rows, features] to `labels`.

    Standardising makes one regularisation strength fit every layer, whose scales differ by
    orders of magnitude in real models; the L2 penalty keeps a probe with more features than
    rows from memorising them. lbfgs fits the multinomial (softmax) model for more than two
    classes.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    weight = "balanced" if balanced else None
    clf = make_pipeline(
        StandardScaler(),
        LogisticRegression(
            C=LINEAR_C, class_weight=weight, tol=LINEAR_TOL, max_iter=2000, random_state=seed
        ),
    )
    classes = len(set(labels))
    small = x.shape[0] * x.shape[1] * (classes if classes > 2 else 1) < SMALL_FIT
    threads = threadpool_limits(1) if small else contextlib.nullcontext()
    with threads, warnings.catch_warnings():
        # A near-separable probe may stop at max_iter: still a probe, and no noise in the logs.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, list(labels))
    return clf


# `answers`: one class per answer string, read at the prompt's last token.


def fit_classifier(x: np.ndarray, labels: Sequence[str], seed: int) -> Any:
    """The `answers` classifier: from prompt states `x` to answer strings."""
    if len(set(labels)) < 2:
        raise ValueError("the linear probe needs train answers of at least 2 distinct values")
    return _fit(x, labels, seed, balanced=False)


def classifier_credits(clf: Any, x: np.ndarray, questions: Sequence[dict]) -> list[float]:
    """Per question: the credit for answering by the choice whose class the classifier finds
    most probable; a choice it never saw as a class ranks last (probability -1)."""
    proba = clf.predict_proba(x)
    column = {label: i for i, label in enumerate(clf.classes_)}
    credits = []
    for row, q in zip(proba, questions, strict=True):
        scores = [
            float(row[column[c.strip()]]) if c.strip() in column else -1.0 for c in q["choices"]
        ]
        credits.append(tie_credit(scores, int(q["answer"])))
    return credits


def cross_validated(x: np.ndarray, train: Sequence[dict], seed: int) -> float:
    """`answers` accuracy on held-out folds of the train questions, folds grouped by fact.

    Only held-out questions whose answer the fold's classifier saw as a class are counted: on
    the world an answer value is the answer of one or two facts per group, so a fold often holds
    out the only fact with some answer, which no classifier can name whatever the layer knows;
    counting those would bury the layer's signal in a constant floor.
    """
    folds = fact_folds(train, seed)
    labels = [answer_text(q) for q in train]
    total, counted = 0.0, 0
    for (fit_rows, _), held_rows in zip(folds, _countable(folds, train), strict=True):
        if not held_rows:
            continue
        clf = fit_classifier(x[fit_rows], [labels[i] for i in fit_rows], seed)
        total += sum(classifier_credits(clf, x[held_rows], [train[i] for i in held_rows]))
        counted += len(held_rows)
    if counted == 0:
        raise ValueError(
            "the linear probe cannot cross-validate: no train answer belongs to two facts"
        )
    return total / counted


# `statements`: right or wrong, read at the end of the prompt followed by each choice.


def _spans(questions: Sequence[dict]) -> list[range]:
    """Each question's rows among its statements (`statement_ids` order)."""
    spans, start = [], 0
    for q in questions:
        spans.append(range(start, start + len(q["choices"])))
        start += len(q["choices"])
    return spans


def statement_features(x: np.ndarray, questions: Sequence[dict]) -> np.ndarray:
    """Each statement's state minus the mean over its question's statements.

    A question is answered by comparing its own choices, so what they share (the prompt, the
    entity) is removed: the classifier learns what tells the right statement from the others,
    not which questions it has seen.
    """
    out = np.empty_like(x)
    for span in _spans(questions):
        rows = x[span.start : span.stop]
        out[span.start : span.stop] = rows - rows.mean(axis=0, keepdims=True)
    return out


def statement_labels(questions: Sequence[dict]) -> list[int]:
    """1 for the statement that ends in the right answer, 0 for the others."""
    return [int(i == int(q["answer"])) for q in questions for i in range(len(q["choices"]))]


def fit_statement_classifier(x: np.ndarray, labels: Sequence[int], seed: int) -> Any:
    """The `statements` classifier: right (1) or wrong (0) from statement features. Classes
    are weighted by their frequency: a question has one right statement and k-1 wrong ones."""
    if len(set(labels)) < 2:
        raise ValueError("the linear probe needs both right and wrong train statements")
    return _fit(x, labels, seed, balanced=True)


def statement_credits(clf: Any, x: np.ndarray, questions: Sequence[dict]) -> list[float]:
    """Per question: the credit for answering by the choice whose statement the classifier
    scores most likely right (`x`: the questions' statement features, in order)."""
    scores = clf.decision_function(x)
    return [
        tie_credit([float(s) for s in scores[span.start : span.stop]], int(q["answer"]))
        for span, q in zip(_spans(questions), questions, strict=True)
    ]


def cross_validated_statements(x: np.ndarray, train: Sequence[dict], seed: int) -> float:
    """`statements` accuracy on held-out folds of the train questions (`x`: their statement
    features), folds grouped by fact: every statement of a question, and of every paraphrase
    of its fact, sits on one side of each split. Every held-out question counts."""
    spans = _spans(train)
    labels = statement_labels(train)
    total = 0.0
    for fit_rows, held_rows in fact_folds(train, seed):
        rows = [r for i in fit_rows for r in spans[i]]
        clf = fit_statement_classifier(x[rows], [labels[r] for r in rows], seed)
        held = [r for i in held_rows for r in spans[i]]
        total += sum(statement_credits(clf, x[held], [train[i] for i in held_rows]))
    return total / len(train)
