"""Native cloze evaluator for 4-choice questions.

Scoring follows lm-evaluation-harness's `loglikelihood` request exactly, so the two backends agree
on the same task and model: the continuation tokens are `encode(prompt + choice)` minus the tokens
of `encode(prompt)`, with no special tokens, and a choice's score is the sum of its tokens'
log-probabilities. `acc` takes the argmax score, `acc_norm` the argmax of score per character of
the choice (lm-eval's length normalisation), and `correct_prob` is the softmax over the four
scores at the right answer (the seeds' "cloze correct prob").

It is batched over (question, choice) pairs: pairs are sorted by length so a batch wastes little
padding, right-padded, and run in one forward each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from unlearn.eval.collapse import collapse_report


@dataclass(frozen=True)
class QuestionScore:
    """Log-likelihoods of one question's choices and what each metric picked."""

    loglik: tuple[float, ...]
    """Sum of continuation-token log-probs per choice."""
    n_chars: tuple[int, ...]
    answer: int
    choices: tuple[str, ...]

    @property
    def pred(self) -> int:
        return max(range(len(self.loglik)), key=lambda i: self.loglik[i])

    @property
    def pred_norm(self) -> int:
        return max(range(len(self.loglik)), key=lambda i: self.loglik[i] / max(self.n_chars[i], 1))

    @property
    def correct_prob(self) -> float:
        m = max(self.loglik)
        exps = [math.exp(x - m) for x in self.loglik]
        return exps[self.answer] / sum(exps)


def _encode_pair(tokenizer, prompt: str, choice: str) -> tuple[list[int], int]:
    """Token ids of prompt+choice and how many trailing ones are the choice (lm-eval's split)."""
    whole = tokenizer(prompt + choice, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n_cont = len(whole) - len(ctx)
    if n_cont <= 0:
        raise ValueError(f"choice {choice!r} adds no tokens to prompt {prompt!r}")
    return whole, n_cont


@torch.no_grad()
def score_questions(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[dict],
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "eval",
) -> list[QuestionScore]:
    """Score every choice of every question; returns one QuestionScore per question, in order."""
    pairs: list[tuple[int, int, list[int], int]] = []  # (question idx, choice idx, ids, n_cont)
    for qi, q in enumerate(questions):
        for ci, choice in enumerate(q["choices"]):
            ids, n_cont = _encode_pair(tokenizer, q["prompt"], choice)
            pairs.append((qi, ci, ids, n_cont))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loglik: dict[tuple[int, int], float] = {}
    # Longest first: the first batch is the biggest, so an out-of-memory shows up at once.
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][2]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        width = max(len(pairs[i][2]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = pairs[i][2]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, i in enumerate(batch):
            qi, ci, seq, n_cont = pairs[i]
            n = len(seq)
            # Token t is predicted at position t-1.
            positions = torch.arange(n - n_cont - 1, n - 1)
            targets = torch.tensor(seq[n - n_cont :])
            loglik[(qi, ci)] = logprobs[row, positions, targets].sum().item()
    if was_training:
        model.train()
    return [
        QuestionScore(
            loglik=tuple(loglik[(qi, ci)] for ci in range(len(q["choices"]))),
            n_chars=tuple(len(c) for c in q["choices"]),
            answer=int(q["answer"]),
            choices=tuple(q["choices"]),
        )
        for qi, q in enumerate(questions)
    ]


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
        [s.pred for s in scores], [s.choices[s.pred] for s in scores], n_choices=4
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
    from unlearn.distributed import is_main, score_sharded

    def score(shard: Sequence[dict]) -> list[QuestionScore]:
        return score_questions(model, tokenizer, shard, batch_size, progress and is_main(), desc)

    return summarize(score_sharded(score, questions))


WORLD_TASKS = ("forget", "forget_heldout", "forget_attack", "retain")


def evaluate_world(
    model: torch.nn.Module,
    tokenizer,
    world,
    tasks: Sequence[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    limit: int | None = None,
) -> dict[str, dict]:
    """Evaluate a model on the mini world's question sets: {task: metrics}."""
    from unlearn.fsutil import read_jsonl

    results = {}
    for task in tasks or WORLD_TASKS:
        if task not in world.questions:
            raise KeyError(f"world has no task {task!r} (has {sorted(world.questions)})")
        questions = read_jsonl(world.questions[task])[:limit]
        results[task] = evaluate_questions(
            model, tokenizer, questions, batch_size, progress, desc=task
        )
    return results


NUMERIC_METRICS = ("acc", "acc_norm", "correct_prob")


def numeric_metrics(result: dict) -> dict[str, float]:
    """The numbers of a task result (metrics and their stderrs), for stores and tables."""
    out = {}
    for name in NUMERIC_METRICS:
        out[name] = result[name]
        out[f"{name}_stderr"] = result[f"{name}_stderr"]
    return out
