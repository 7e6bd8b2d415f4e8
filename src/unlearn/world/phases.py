"""The parts of the world's pretraining: its model, packed token streams, one training phase,
and the filtered twin's phase 2 (run here or in a second process, `unlearn.world.parallel`).

Design choices:

- Documents are packed: each epoch the pool is shuffled, documents are joined with EOS and the
  token stream is cut into `seq_len` rows; leftover tokens carry over into the next epoch, so no
  document tail is systematically dropped. Phase 2's pool is its own stream, so the target and
  the twin differ only in whether forget documents are in it.
- AdamW with a one-cycle schedule over the whole run (linear warmup, cosine decay to
  `final_lr_ratio * lr`), computed from the global optimizer step, so phase 2 of both runs
  follows the same LR curve.
- No dropout and a seeded init inside `torch.random.fork_rng`, so a build is deterministic on
  one machine with a fixed thread count and never disturbs the caller's RNG state.
- The twin's phase 2 is one function, `train_twin`, from a *copy* of the phase-1 state (state
  dicts), whether it runs in this process after the target's phase 2 or in a spawned one beside
  it: with the same thread count both give the same weights. A copy, because an optimizer's
  `load_state_dict` keeps the very tensors it is given: a twin loaded from the live optimizer
  would share its Adam moments with the target and start from wherever the target left them.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from unlearn.world.generate import CORPUS_PHASES
from unlearn.world.presets import Preset


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch CPU threads set to `threads` (None: unchanged) inside the block, then restored."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_model(preset: Preset, vocab_size: int, eos_id: int, seed: int) -> GPTNeoXForCausalLM:
    """A randomly initialised GPT-NeoX of the preset's size (seeded, caller's RNG untouched)."""
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        intermediate_size=4 * preset.hidden_size,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPTNeoXForCausalLM(config)


class PackedStream:
    """Endless batches of `batch_size` x `seq_len` tokens packed from a pool of documents."""

    def __init__(
        self, docs: Sequence[list[int]], eos_id: int, seq_len: int, batch_size: int, seed: int
    ) -> None:
        if not docs:
            raise ValueError("no documents to pack")
        self.docs, self.eos_id = list(docs), eos_id
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rng = random.Random(seed)
        self.buffer: list[int] = []
        self.epochs = 0

    def _refill(self) -> None:
        order = list(range(len(self.docs)))
        self.rng.shuffle(order)
        for i in order:
            self.buffer.extend(self.docs[i])
            self.buffer.append(self.eos_id)
        self.epochs += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        need = self.seq_len * self.batch_size
        while True:
            while len(self.buffer) < need:
                self._refill()
            batch, self.buffer = self.buffer[:need], self.buffer[need:]
            yield torch.tensor(batch, dtype=torch.long).view(self.batch_size, self.seq_len)


def lr_at(step: int, preset: Preset) -> float:
    """One-cycle LR at optimizer step `step` (0-based) of the whole run."""
    if step < preset.warmup_steps:
        return preset.lr * (step + 1) / preset.warmup_steps
    span = max(preset.total_steps - preset.warmup_steps, 1)
    progress = min((step - preset.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return preset.lr * (preset.final_lr_ratio + (1 - preset.final_lr_ratio) * cosine)


@dataclass
class PhaseResult:
    """What one training phase did: where it ended, its loss, its checkpoints and its cost."""

    end_step: int
    final_loss: float
    tokens: int
    epochs: float
    seconds: float
    checkpoints: list[Path] = field(default_factory=list)


def train_phase(
    model: GPTNeoXForCausalLM,
    optimizer: torch.optim.Optimizer,
    stream: PackedStream,
    preset: Preset,
    start_step: int,
    steps: int,
    save: Callable[[int], Path] | None = None,
    save_at: Collection[int] = (),
    progress: bool = True,
    desc: str = "pretrain",
) -> PhaseResult:
    """Train `steps` optimizer steps from global step `start_step`.

    After each step whose global count is in `save_at`, `save(count)` writes a checkpoint.
    """
    t0 = time.perf_counter()
    model.train()
    pool_tokens = sum(len(d) + 1 for d in stream.docs)
    result = PhaseResult(start_step, float("nan"), 0, 0.0, 0.0)
    batches = iter(stream)
    ema: float | None = None
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for step in range(start_step, start_step + steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, preset)
            batch = next(batches)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            result.tokens += batch.numel()
            done = step + 1
            if save is not None and done in save_at:
                result.checkpoints.append(save(done))
            bar.update(1)
            if done % 20 == 0:
                bar.set_postfix(loss=f"{ema:.3f}")
    result.end_step = start_step + steps
    result.final_loss = float(ema) if ema is not None else float("nan")
    result.epochs = result.tokens / pool_tokens
    result.seconds = time.perf_counter() - t0
    return result


def make_optimizer(model: torch.nn.Module, preset: Preset) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.parameters(), lr=preset.lr, betas=(0.9, 0.95), weight_decay=preset.weight_decay
    )


@dataclass(frozen=True)
class TwinJob:
    """The filtered twin's phase 2, all but the phase-1 state (picklable: a spawned process gets
    it as is)."""

    preset: Preset
    pool: list[list[int]]
    """Tokenized phase-2 documents without the forget ones (no EOS)."""
    eos_id: int
    vocab_size: int
    stream_seed: int
    start_step: int


def train_twin(
    job: TwinJob,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: dict,
    progress: bool = True,
) -> tuple[GPTNeoXForCausalLM, PhaseResult]:
    """The filtered twin's phase 2 from a copy of the phase-1 model and optimizer state."""
    preset = job.preset
    # Any init will do: every parameter is overwritten by the phase-1 state.
    twin = make_model(preset, job.vocab_size, job.eos_id, seed=0)
    twin.load_state_dict(model_state)
    optimizer = make_optimizer(twin, preset)
    optimizer.load_state_dict(optimizer_state)
    stream = PackedStream(job.pool, job.eos_id, preset.seq_len, preset.batch_size, job.stream_seed)
    result = train_phase(
        twin, optimizer, stream, preset, job.start_step, preset.phase2_steps,
        progress=progress, desc="phase 2 (filtered twin)",
    )  # fmt: skip
    return twin.eval(), result


def training_pools(docs: Mapping[str, list[list[int]]]) -> dict[str, list[list[int]]]:
    """Corpus documents grouped by when pretraining sees them: {"both", "late", "forget"} (the
    `none` corpora, held out for evaluation, are left out)."""
    pools: dict[str, list[list[int]]] = {"both": [], "late": [], "forget": []}
    for name, ds in docs.items():
        phase = CORPUS_PHASES.get(name)
        if phase is None:
            raise ValueError(f"corpus {name!r} has no pretraining phase (see CORPUS_PHASES)")
        if phase != "none":
            pools[phase].extend(ds)
    return pools
