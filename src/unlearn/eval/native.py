"""Native log-likelihood evaluator: multiple-choice questions scored in our own batched forwards.

Scoring follows lm-evaluation-harness's `loglikelihood` request exactly, so the two backends agree
on the same task and model. A request is (context, continuation); like lm-eval's HF model:

- trailing whitespace of the context moves to the start of the continuation;
- the continuation's tokens are `encode(context + continuation)` minus `encode(context)`;
- `special_tokens` is lm-eval's `add_bos_token`: None encodes with the tokenizer's default (a
  Llama tokenizer adds BOS, GPT-NeoX's does not: lm-eval's default for benchmarks), False adds
  none (the world's cloze tasks); a text already starting with the BOS string gets none;
- an empty context is the prefix token (BOS, else EOS) and the continuation encoded alone;
- a sequence longer than the model's context window keeps its last tokens (lm-eval's
  `resolve_max_length` gives the window);
- a choice's score is the sum of its tokens' log-probabilities, and "greedy" says whether every
  token is the argmax at its position.

Questions (`{prompt, choices, answer}`) are requests (prompt, choice): `acc` takes the argmax
score, `acc_norm` the argmax of score per character of the choice (lm-eval's length
normalisation), and `correct_prob` is the softmax over the question's choice scores at the right
answer (the reference campaign's "cloze correct prob"). Question files are validated as they are
read (`unlearn.eval.questions`); letter multiple choice (`unlearn.eval.letter`) and lm-eval's own
task objects (`unlearn.eval.lm_tasks`) are turned into requests and scored here too.

It is batched: requests that share a context and whose continuations are each one token are one
row (all read at the context's last position: the same numbers as a row each, one forward instead
of len(choices)); any other request is its own row; rows are sorted by length so a batch wastes
little padding, right-padded, and run in one forward each. Under torchrun the batches (not the
questions) are shared out over the ranks, so every rank runs the same number of forwards.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from unlearn.distributed import is_main, map_sharded, world_size
from unlearn.eval.collapse import collapse_report
from unlearn.eval.encoding import Request, Row, encoded_rows
from unlearn.eval.questions import question_problem
from unlearn.eval.tasks.utils import argmax, correct_prob, per_character
from unlearn.models.modes import eval_mode


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


def context_window(model: torch.nn.Module, tokenizer) -> int:
    """The model's context length as lm-eval resolves it (config, tokenizer, else 2048)."""
    from lm_eval.models.utils import resolve_max_length  # the same rule, so truncation agrees

    return resolve_max_length(getattr(model, "config", None), tokenizer, default=2048)


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do; a DDP
    or peft wrapper passes it through to the model it wraps)."""
    inner = getattr(model, "module", model)  # DDP
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def right_padded_forward(model: torch.nn.Module, ids: torch.Tensor, **kwargs):
    """The model's forward on right-padded rows, as lm-eval runs it: no attention mask and no
    key/value cache. In a causal model a real token never attends to the pads after it, so every
    position that is read gets exactly an unpadded row's logits, and without a mask the attention
    takes its causal fast path; nothing is generated, so a cache is only work (the mask and the
    cache were about a tenth of an evaluation of the default world's target)."""
    return model(input_ids=ids, use_cache=False, **kwargs)


@torch.no_grad()
def score_requests(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[Request],
    batch_size: int = 64,
    special_tokens: bool | None = False,
    progress: bool = False,
    desc: str = "eval",
) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each request's continuation, in order.

    Under torchrun the *batches* are sharded over the ranks (`distributed.map_sharded`): every
    rank builds the same rows and batches, runs its share (padded to an equal count, because an
    FSDP2 forward is a collective) and gets every batch's scores back. Sharding questions instead
    would not do: a question is 1 row or one per choice, so equal question counts can still mean
    unequal forwards.
    """
    rows = encoded_rows(tokenizer, requests, special_tokens, context_window(model, tokenizer))
    device = next(model.parameters()).device
    # Longest first: the first batch is the biggest, so an out-of-memory shows up at once.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    share = -(-len(batches) // world_size())  # the forwards this rank runs
    bar = tqdm(total=share, desc=desc, disable=not (progress and is_main()), leave=False)

    def run(batch: list[int]) -> dict[int, tuple[float, bool]]:
        bar.update(1)
        return _score_batch(model, [rows[i] for i in batch], pad_id, device)

    scores: dict[int, tuple[float, bool]] = {}
    with eval_mode(model):
        for part in map_sharded(run, batches):  # a request's tokens are all in one row
            scores.update(part)
    bar.close()
    return [scores[i] for i in range(len(requests))]


def _score_batch(
    model: torch.nn.Module, rows: Sequence[Row], pad_id: int, device: torch.device
) -> dict[int, tuple[float, bool]]:
    """One right-padded forward of `rows`: {request idx: (log-likelihood, greedy)}."""
    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row.ids)] = torch.tensor(row.ids)
    keys, rows_at, positions, targets = [], [], [], []
    for b, row in enumerate(rows):
        for request, first, tokens in row.reads:
            for k, token in enumerate(tokens):
                keys.append(request)
                rows_at.append(b)
                positions.append(first + k)
                targets.append(token)
    inputs: dict[str, torch.Tensor] = {}
    # Unembed only the positions that are read (token t is predicted at position t-1): the
    # model's own head runs on them (its scaling or soft-capping included), not on every token.
    kept = sorted(set(positions))
    column = {p: i for i, p in enumerate(kept)}
    if _keeps_logits(model):
        inputs["logits_to_keep"] = torch.tensor(kept, device=device)
    else:
        column = {p: p for p in kept}
    logits = right_padded_forward(model, ids.to(device), **inputs).logits
    picked = logits[torch.tensor(rows_at), torch.tensor([column[p] for p in positions])].float()
    logprobs = torch.log_softmax(picked, dim=-1)
    wanted = torch.tensor(targets, device=logprobs.device)[:, None]
    token_lp = logprobs.gather(1, wanted)[:, 0].cpu().tolist()
    token_greedy = (picked.argmax(dim=-1) == wanted[:, 0]).cpu().tolist()
    out: dict[int, tuple[float, bool]] = {}
    for key, value, greedy in zip(keys, token_lp, token_greedy, strict=True):
        total, all_greedy = out.get(key, (0.0, True))
        out[key] = (total + value, all_greedy and bool(greedy))
    return out


def score_questions(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[dict],
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "eval",
    special_tokens: bool | None = False,
) -> list[QuestionScore]:
    """Score every choice of every question; returns one QuestionScore per question, in order.

    A question that cannot be scored (see `unlearn.eval.questions`) is a ValueError: files are
    checked when read, this guards callers that build questions in code.
    """
    for i, q in enumerate(questions):
        problem = question_problem(q)
        if problem is not None:
            raise ValueError(f"question {i}: {problem}")
    requests = [(q["prompt"], c) for q in questions for c in q["choices"]]
    scores = iter(
        score_requests(model, tokenizer, requests, batch_size, special_tokens, progress, desc)
    )
    return [
        QuestionScore(
            loglik=tuple(next(scores)[0] for _ in q["choices"]),
            answer=int(q["answer"]),
            choices=tuple(q["choices"]),
        )
        for q in questions
    ]


def mean_stderr(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and its sample standard error (lm-eval's stderr of a `mean` aggregation)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def summarize(scores: Sequence[QuestionScore]) -> dict:
    """Task metrics of question scores: acc, acc_norm, correct_prob, stderrs, n, collapse."""
    n = len(scores)
    if n == 0:
        raise ValueError("no questions to summarize")
    acc = [float(s.pred == s.answer) for s in scores]
    acc_norm = [float(s.pred_norm == s.answer) for s in scores]
    prob = [s.correct_prob for s in scores]

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
    special_tokens: bool | None = False,
) -> dict:
    """Score and summarize one task (sharded over the ranks when run under torchrun)."""
    return summarize(
        score_questions(model, tokenizer, questions, batch_size, progress, desc, special_tokens)
    )


NUMERIC_METRICS = ("acc", "acc_norm", "correct_prob")
"""The metrics of the native question tasks (a benchmark reports those its config lists)."""


def numeric_metrics(result: dict) -> dict[str, float]:
    """The numbers of a task result (metrics and their stderrs, no count, no collapse report),
    for stores and tables; a stderr lm-eval could not compute (None) is left out."""
    return {
        k: float(v)
        for k, v in result.items()
        if k not in ("n", "collapse", "status")
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    }
