"""Tokenized examples and the deterministic example stream the trainer draws from.

An example is one document, truncated to `max_length` tokens (the reference campaign's
num_train_examples counts documents). Batches are right-padded with an attention mask; every loss is
a masked token mean, so padding never counts.

`ExampleStream` defines a *global* order of examples: epoch e is a permutation seeded by
(seed, e), and micro-batch k holds examples [k*B, (k+1)*B) of the concatenated epochs. The trainer
asks for micro-batch k = (step * accum + a) * world_size + rank, so the batch a step sees depends
only on the step (resuming at step s reproduces the uninterrupted run exactly) and the same global
batch is seen by 1 process with accumulation 2 as by 2 processes with accumulation 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unlearn.training.frozen_cache import example_digest


@dataclass
class Batch:
    input_ids: torch.Tensor
    """[batch, seq] token ids, right-padded."""
    attention_mask: torch.Tensor
    """[batch, seq] 1 for real tokens, 0 for padding."""

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device))

    @property
    def mask(self) -> torch.Tensor:
        return self.attention_mask.bool()

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def tokenize_examples(texts: Sequence[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of each document, truncated to max_length; empty documents are dropped."""
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)
    return [ids for ids in enc["input_ids"] if ids]


def collate(examples: Sequence[Sequence[int]], pad_id: int) -> Batch:
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e)] = torch.as_tensor(e, dtype=torch.long)
        mask[i, : len(e)] = 1
    return Batch(ids, mask)


class ExampleStream:
    """Deterministic, resumable, rank-aware micro-batches over a list of examples."""

    def __init__(
        self, examples: Sequence[Sequence[int]], batch_size: int, pad_id: int, seed: int
    ) -> None:
        if not examples:
            raise ValueError("no examples")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self._perms: dict[int, list[int]] = {}
        self._digests: dict[int, str] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.examples), generator=g).tolist()
        return self._perms[epoch]

    def indices(self, k: int) -> list[int]:
        """Example indices of global micro-batch k."""
        n = len(self.examples)
        out = []
        for pos in range(k * self.batch_size, (k + 1) * self.batch_size):
            epoch, i = divmod(pos, n)
            out.append(self._perm(epoch)[i])
        return out

    def example_ids(self, k: int) -> list[str]:
        """Identities of the examples in micro-batch k, row by row: digests of their token ids,
        so a frozen output cached for an example is found whatever batch or run it is drawn in."""
        out = []
        for i in self.indices(k):
            if i not in self._digests:
                self._digests[i] = example_digest(self.examples[i])
            out.append(self._digests[i])
        return out

    def batch(self, k: int) -> Batch:
        return collate([self.examples[i] for i in self.indices(k)], self.pad_id)
