"""Two-phase pretraining of the world's small GPT-NeoX, its checkpoints and its filtered twin.

Phase 1 trains on the corpora of both phases (retain, near-domain, filler); phase 2 adds the
late retain documents and the forget documents, each upsampled by `forget_weight`. The last
phase-1 checkpoint has never seen a forget or late-retain document: it is the "ignorant"
checkpoint that checkpoint-transfer unlearning takes source activations from. The filtered
twin is the gold standard a tamper attack is compared with: same schedule and token budget, no
forget documents (it does see the late retain documents: the filter removes forget documents only).
Phase 1 is identical for both runs (same data, same steps, deterministic), so the twin starts
from the saved phase-1 state (weights *and* optimizer state) and continues phase 2 without the
forget documents, instead of recomputing phase 1. The two phase-2 runs are independent, so a build
can run the twin's in a second process at the same time (`unlearn.world.parallel`).

The parts (model, packed streams, one phase, the twin's phase 2) are in `unlearn.world.phases`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPTNeoXForCausalLM

from unlearn.world.parallel import TwinProcess
from unlearn.world.phases import (
    PackedStream,
    PhaseResult,
    TwinJob,
    make_model,
    make_optimizer,
    torch_threads,
    train_phase,
    train_twin,
    training_pools,
)
from unlearn.world.presets import Preset


@dataclass
class PretrainResult:
    """Both runs of a world's pretraining; models are left in memory for evaluation."""

    target: GPTNeoXForCausalLM
    filtered: GPTNeoXForCausalLM
    phase1: PhaseResult
    target_phase2: PhaseResult
    filtered_phase2: PhaseResult
    phase2_seconds: float
    """Wall time of both phase-2 runs (their sum when sequential, about the longer one when
    parallel, plus the child's start-up)."""
    params: int


def pretrain(
    preset: Preset,
    docs: dict[str, list[list[int]]],
    eos_id: int,
    seed: int,
    save_checkpoint: Callable[[GPTNeoXForCausalLM, int], Path],
    vocab_size: int,
    progress: bool = True,
    phase2_threads: int | None = None,
    parallel: bool = False,
    workdir: Path | None = None,
) -> PretrainResult:
    """Phase 1, then phase 2 with forget documents (target) and without them (filtered twin).

    `docs` maps corpus name -> tokenized documents (no EOS); `generate.CORPUS_PHASES` says which
    phase sees each (an unknown corpus name is a ValueError: nothing trains on data by accident).
    `save_checkpoint(model, step)` writes a target checkpoint. Each phase-2 run uses
    `phase2_threads` torch threads (None: the current count); with `parallel` the twin's runs in a
    spawned process beside the target's, its files in a temp directory under `workdir` (None:
    the system's).
    """
    pools = training_pools(docs)
    clean = pools["both"]
    late = pools["late"] * preset.forget_weight
    forget = pools["forget"] * preset.forget_weight
    model = make_model(preset, vocab_size, eos_id, seed)
    optimizer = make_optimizer(model, preset)

    def stream(pool: list[list[int]], salt: int) -> PackedStream:
        return PackedStream(pool, eos_id, preset.seq_len, preset.batch_size, seed * 1000 + salt)

    def save(step: int) -> Path:
        return save_checkpoint(model, step)

    # Checkpoints every interval; the final step is the target itself, saved by the caller.
    every = range(preset.checkpoint_interval, preset.total_steps, preset.checkpoint_interval)
    phase1 = train_phase(
        model, optimizer, stream(clean, 1), preset, 0, preset.phase1_steps, save, every,
        progress, "phase 1 (no forget, no late retain)",
    )  # fmt: skip
    twin_job = TwinJob(preset, clean + late, eos_id, vocab_size, seed * 1000 + 2, phase1.end_step)
    target_stream = stream(clean + late + forget, 2)

    def train_target(desc: str) -> PhaseResult:
        return train_phase(
            model, optimizer, target_stream, preset, phase1.end_step, preset.phase2_steps,
            save, every, progress, desc,
        )  # fmt: skip

    t0 = time.perf_counter()
    with torch_threads(phase2_threads):
        if parallel:
            threads = torch.get_num_threads()
            with TwinProcess(twin_job, model, optimizer, threads, workdir) as twin_process:
                target_phase2 = train_target("phase 2 (target; filtered twin in a 2nd process)")
                twin, filtered_phase2 = twin_process.result()
        else:
            model_state = copy.deepcopy(model.state_dict())
            optimizer_state = copy.deepcopy(optimizer.state_dict())
            target_phase2 = train_target("phase 2 (target)")
            twin, filtered_phase2 = train_twin(twin_job, model_state, optimizer_state, progress)
    return PretrainResult(
        target=model.eval(),
        filtered=twin,
        phase1=phase1,
        target_phase2=target_phase2,
        filtered_phase2=filtered_phase2,
        phase2_seconds=time.perf_counter() - t0,
        params=sum(p.numel() for p in model.parameters()),
    )
