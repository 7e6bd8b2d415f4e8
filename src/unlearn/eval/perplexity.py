"""Per-token perplexity on held-out documents: a fluency metric that accuracy does not see.

    result = evaluate_perplexity(model, tokenizer, texts)  # ppl, nll, tokens, n, collapse

An unlearning method can keep every fact accuracy while damaging the model's text (repetition,
odd tokens after the forget-domain words): perplexity on documents no model was trained on shows
it. Lower is better; it is reported, never a forget or retain accuracy.

Design choices:
- Each document is encoded without special tokens and prefixed with the tokenizer's BOS token
  (else EOS: the world's tokenizer has only EOS, which separates its packed pretraining
  documents), so the document's first token is predicted too, from the prefix alone. Every
  document token is predicted exactly once; the prefix never is.
- `ppl` = exp(total NLL / total predicted tokens) over all documents: per token, so a document
  weighs by its length (not a mean of per-document perplexities); `nll` is that mean per-token
  negative log-likelihood in nats, `tokens` the predicted tokens, `n` the documents.
- A document longer than the model's context window W (`native.context_window`, lm-eval's rule)
  is split into consecutive windows that do not overlap: window k feeds tokens kW .. kW+W-1 of
  prefix + document and predicts tokens kW+1 .. kW+W. A later window's first prediction sees
  only the token before it, as in lm-eval's rolling log-likelihood (a context of one token):
  every token is still predicted once, and no token is predicted twice. This is cheaper than a
  strided (overlapping) evaluation and gives it an upper bound.
- The windows are rows, sorted longest first (an out-of-memory shows at the first batch),
  right-padded, `batch_size` rows per forward under `models.modes.eval_mode` and no_grad; each row's
  log-probs are taken in float32 one row at a time, so the float32 copy is one row's logits,
  not the batch's. Under torchrun the batches are shared over the ranks with
  `distributed.map_sharded`, as the question evaluator does; the per-row sums are added in row
  order, so every rank (and any process count) gets the same number.

Document files (`read_documents`, for `ppl:PATH` tasks and a world's held-out documents): a
`.jsonl` / `.json` file holds one `{"text": ...}` object per line (other fields are ignored);
any other file is plain text, one document per block of lines separated by blank lines.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unlearn.distributed import is_main, map_sharded, world_size
from unlearn.errors import UsageError
from unlearn.eval.encoding import prefix_token
from unlearn.eval.native import context_window, right_padded_forward
from unlearn.fsutil import json_kind, jsonl_rows, read_text
from unlearn.models.modes import eval_mode

PPL_METRICS = ("ppl", "nll", "tokens")
"""The numbers of a perplexity result that eval rows carry (ppl is the one tables show)."""
JSONL_SUFFIXES = (".jsonl", ".json")
MAX_NLL = 700.0
COLLAPSE_NATS = 1.0
"""A perplexity result is collapsed when its NLL per token exceeds the uniform distribution's
(log of the vocabulary size) by more than this: perplexity above e times the vocabulary size."""
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a `.jsonl` file of `{"text": str}` rows or of a plain-text file (blocks
    separated by blank lines); UsageError naming FILE:LINE for a bad row, or for no documents."""
    path = Path(path)
    if path.suffix in JSONL_SUFFIXES:
        texts = []
        for line, row in jsonl_rows(path):
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                got = "no field 'text'" if "text" not in row else json_kind(text)
                raise UsageError(f"{path}:{line}: expected a non-empty string 'text', got {got}")
            texts.append(text)
    else:
        blocks = _BLANK_LINE.split(read_text(path).replace("\r\n", "\n"))
        texts = [b.strip() for b in blocks if b.strip()]
    if not texts:
        raise UsageError(f"{path}: no documents (the file is empty)")
    return texts


def _windows(ids: Sequence[int], width: int) -> list[list[int]]:
    """Consecutive windows of `ids` (prefix + document) that predict each token after the first
    once: a window holds up to width + 1 tokens, its inputs all but its last token and its
    targets all but its first; a window's last token is the next window's first."""
    return [list(ids[start : start + width + 1]) for start in range(0, len(ids) - 1, width)]


def _row_nll(
    model: torch.nn.Module, rows: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[list[float], int]:
    """One right-padded forward of `rows`: the summed NLL (nats) of each row's targets, and the
    size of the distribution the model predicts (its logits' last dimension)."""
    width = max(len(row) for row in rows) - 1
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row) - 1] = torch.tensor(row[:-1])
    logits = right_padded_forward(model, ids.to(device)).logits
    sums = []
    for b, row in enumerate(rows):
        targets = torch.tensor(row[1:], device=logits.device)
        lp = torch.log_softmax(logits[b, : len(targets)].float(), dim=-1)
        sums.append(-lp.gather(1, targets[:, None]).double().sum().item())
    return sums, logits.shape[-1]


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "ppl",
) -> dict:
    """`{"ppl", "nll", "tokens", "n"}` of the model on `texts` (module docstring: the prefix
    token, the windows, the batching). ValueError when the texts hold no token to predict."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prefix = prefix_token(tokenizer)
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    width = context_window(model, tokenizer)
    rows = [w for ids in encoded if ids for w in _windows([prefix, *ids], width)]
    tokens = sum(len(ids) for ids in encoded)
    if tokens == 0:
        raise ValueError("no document tokens to predict")
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    share = -(-len(batches) // world_size())  # the forwards this rank runs
    bar = tqdm(total=share, desc=desc, disable=not (progress and is_main()), leave=False)

    vocab = 0

    def run(batch: list[int]) -> list[tuple[int, float]]:
        nonlocal vocab
        bar.update(1)
        sums, vocab = _row_nll(model, [rows[i] for i in batch], pad_id, device)
        return list(zip(batch, sums, strict=True))

    nll: dict[int, float] = {}
    with eval_mode(model):
        for part in map_sharded(run, batches):
            nll.update(part)
    bar.close()
    mean = sum(nll[i] for i in range(len(rows))) / tokens
    # exp overflows past ~709 nats per token: infinite, which eval rows record as failed.
    ppl = math.exp(mean) if mean < MAX_NLL else math.inf
    # Uniform guessing over the vocabulary has perplexity `vocab` (a randomly initialised model
    # sits near it). A model a nat per token worse than that has lost language modelling
    # whatever its accuracies say (multiple-choice scores compare choices, so they can hide it).
    collapsed = vocab > 0 and mean > math.log(vocab) + COLLAPSE_NATS
    return {"ppl": ppl, "nll": mean, "tokens": tokens, "n": len(texts),
            "collapse": {"collapsed": collapsed, "uniform_ppl": vocab}}  # fmt: skip
