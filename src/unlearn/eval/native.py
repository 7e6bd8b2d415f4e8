"""Native cloze evaluator for multiple-choice questions (any number of choices from two up).

Scoring follows lm-evaluation-harness's `loglikelihood` request exactly, so the two backends agree
on the same task and model: the continuation tokens are `encode(prompt + choice)` minus the tokens
of `encode(prompt)`, with no special tokens, and a choice's score is the sum of its tokens'
log-probabilities. `acc` takes the argmax score, `acc_norm` the argmax of score per character of
the choice (lm-eval's length normalisation), and `correct_prob` is the softmax over the question's
choice scores at the right answer (the seeds' "cloze correct prob"). Question files are validated
as they are read (`unlearn.eval.questions`).

It is batched: a question whose choices are each one token after the prompt is one row (all
choices read at the prompt's last position), any other question one row per choice; rows are
sorted by length so a batch wastes little padding, right-padded, and run in one forward each.
Under torchrun the batches (not the questions) are shared out over the ranks, so every rank runs
the same number of forwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from unlearn.distributed import is_main, map_sharded, world_size
from unlearn.eval.collapse import collapse_report
from unlearn.eval.questions import question_problem
from unlearn.eval.tasks.utils import argmax, correct_prob, per_character
from unlearn.models import eval_mode


@dataclass(frozen=True)
class QuestionScore:
    """Log-likelihoods of one question's choices and what each metric picked."""

    loglik: tuple[float, ...]
    """Sum of continuation-token log-probs per choice."""
    answer: int
    choices: tuple[str, ...]

    # The rules are the bundled lm-eval tasks' own, so the two backends cannot drift apart.
    @property
    def pred(self) -> int:
        return argmax(self.loglik)

    @property
    def pred_norm(self) -> int:
        return argmax(per_character(self.loglik, self.choices))

    @property
    def correct_prob(self) -> float:
        return correct_prob(self.loglik, self.answer)


@dataclass(frozen=True)
class _Row:
    """One sequence to run and the (question, choice) scores read from it.

    `reads` holds (question idx, choice idx, first predicting position, target ids): the choice's
    score is the sum of log p(target_k) at positions first + k.
    """

    ids: list[int]
    reads: list[tuple[int, int, int, list[int]]]


def _rows(tokenizer, questions: Sequence[dict]) -> list[_Row]:
    """The fewest sequences that score every choice.

    A choice's tokens are `encode(prompt + choice)` minus the tokens of `encode(prompt)`, no
    special tokens (lm-eval's split). When each choice of a question adds exactly one token to
    the prompt's own tokens (the usual case for short answers), all of them are read from ONE
    forward of the prompt, at its last position: the same numbers as one row per choice, for
    one forward instead of len(choices). Otherwise each (question, choice) pair is its own row.
    """
    texts = [q["prompt"] for q in questions]
    texts += [q["prompt"] + c for q in questions for c in q["choices"]]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])  # one batched call
    contexts = [next(encoded) for _ in questions]
    rows = []
    for qi, (q, ctx) in enumerate(zip(questions, contexts, strict=True)):
        pairs = [(whole, len(whole) - len(ctx)) for whole in (next(encoded) for _ in q["choices"])]
        for ci, (_, n_cont) in enumerate(pairs):
            if n_cont <= 0:
                raise ValueError(f"choice {q['choices'][ci]!r} adds no tokens to {q['prompt']!r}")
        if ctx and all(n == 1 and ids[:-1] == ctx for ids, n in pairs):
            reads = [(qi, ci, len(ctx) - 1, ids[-1:]) for ci, (ids, _) in enumerate(pairs)]
            rows.append(_Row(ctx, reads))
            continue
        for ci, (ids, n_cont) in enumerate(pairs):
            rows.append(_Row(ids, [(qi, ci, len(ids) - n_cont - 1, ids[len(ids) - n_cont :])]))
    return rows


@torch.no_grad()
def score_questions(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[dict],
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "eval",
) -> list[QuestionScore]:
    """Score every choice of every question; returns one QuestionScore per question, in order.

    Under torchrun the *batches* are sharded over the ranks (`distributed.map_sharded`): every
    rank builds the same rows and batches, runs its share (padded to an equal count, because an
    FSDP2 forward is a collective) and gets every batch's scores back. Sharding questions instead
    would not do: a question is 1 row or one per choice, so equal question counts can still mean
    unequal forwards.

    A question that cannot be scored (see `unlearn.eval.questions`) is a ValueError: files are
    checked when read, this guards callers that build questions in code.
    """
    for i, q in enumerate(questions):
        problem = question_problem(q)
        if problem is not None:
            raise ValueError(f"question {i}: {problem}")
    rows = _rows(tokenizer, questions)
    device = next(model.parameters()).device
    # Longest first: the first batch is the biggest, so an out-of-memory shows up at once.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    share = -(-len(batches) // world_size())  # the forwards this rank runs
    bar = tqdm(total=share, desc=desc, disable=not (progress and is_main()), leave=False)

    def run(batch: list[int]) -> dict[tuple[int, int], float]:
        bar.update(1)
        return _score_batch(model, [rows[i] for i in batch], pad_id, device)

    loglik: dict[tuple[int, int], float] = {}
    with eval_mode(model):
        for part in map_sharded(run, batches):  # a choice's tokens are all in one row: no overlap
            loglik.update(part)
    bar.close()
    return [
        QuestionScore(
            loglik=tuple(loglik[(qi, ci)] for ci in range(len(q["choices"]))),
            answer=int(q["answer"]),
            choices=tuple(q["choices"]),
        )
        for qi, q in enumerate(questions)
    ]


def _score_batch(
    model: torch.nn.Module, rows: Sequence[_Row], pad_id: int, device: torch.device
) -> dict[tuple[int, int], float]:
    """One right-padded forward of `rows`: {(question idx, choice idx): log-likelihood}."""
    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row.ids)] = torch.tensor(row.ids)
        mask[b, : len(row.ids)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    # Normalise only the positions that are read (token t is predicted at position t-1).
    keys, rows_at, positions, targets = [], [], [], []
    for b, row in enumerate(rows):
        for qi, ci, first, tokens in row.reads:
            for k, token in enumerate(tokens):
                keys.append((qi, ci))
                rows_at.append(b)
                positions.append(first + k)
                targets.append(token)
    picked = logits[torch.tensor(rows_at), torch.tensor(positions)].float()
    logprobs = torch.log_softmax(picked, dim=-1)
    token_lp = logprobs.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0].cpu()
    loglik: dict[tuple[int, int], float] = {}
    for key, value in zip(keys, token_lp.tolist(), strict=True):
        loglik[key] = loglik.get(key, 0.0) + value
    return loglik


def summarize(scores: Sequence[QuestionScore]) -> dict:
    """Task metrics of question scores: acc, acc_norm, correct_prob, stderrs, n, collapse."""
    n = len(scores)
    if n == 0:
        raise ValueError("no questions to summarize")
    acc = [float(s.pred == s.answer) for s in scores]
    acc_norm = [float(s.pred_norm == s.answer) for s in scores]
    prob = [s.correct_prob for s in scores]

    def mean_stderr(xs: list[float]) -> tuple[float, float]:
        m = sum(xs) / len(xs)
        if len(xs) < 2:
            return m, 0.0
        var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
        return m, math.sqrt(var / len(xs))

    out: dict = {"n": n}
    for name, xs in (("acc", acc), ("acc_norm", acc_norm), ("correct_prob", prob)):
        out[name], out[f"{name}_stderr"] = mean_stderr(xs)
    out["collapse"] = collapse_report(
        [s.pred for s in scores],
        [s.choices[s.pred] for s in scores],
        n_choices=max(len(s.choices) for s in scores),
    )
    return out


def evaluate_questions(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[dict],
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Score and summarize one task (sharded over the ranks when run under torchrun)."""
    return summarize(score_questions(model, tokenizer, questions, batch_size, progress, desc))


NUMERIC_METRICS = ("acc", "acc_norm", "correct_prob")


def numeric_metrics(result: dict) -> dict[str, float]:
    """The numbers of a task result (metrics and their stderrs), for stores and tables."""
    out = {}
    for name in NUMERIC_METRICS:
        out[name] = result[name]
        out[f"{name}_stderr"] = result[f"{name}_stderr"]
    return out
