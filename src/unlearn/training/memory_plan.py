"""A memory plan before launch (`unlearn run ... --dry-run`): what one device will hold, from the
model's config alone (no weight is read).

    parameters, trainable and frozen        the model built on the meta device (+ LoRA)
    weights, gradients, optimizer state     per device: FSDP2 divides them by the processes
    frozen models                           the full fine-tuning reference (LoRA: none)
    activations per step                    with and without activation checkpointing

Activations are an estimate of what autograd saves, per token and block: about 16 hidden-size
vectors (the norms' inputs and outputs, the attention's inputs, rotated queries and keys, values
and output, the projections' inputs) plus 4 MLP-width vectors for a gated MLP (3 otherwise), in
the compute dtype; plus about three vocabulary-size float32 rows per token for the logits and the
loss. With checkpointing a block keeps only its input, and one block's activations exist at a
time during the recompute. An unlearning step keeps both micro-batches' graphs (forget and
retain) until its backward. The estimate is checked against measured peaks on a 110M Llama
(docs/results/training-memory/report.md); the allocator and the frameworks add a margin that no
formula sees, so plan a device with room to spare.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from unlearn.errors import UsageError

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30


@dataclass
class PlanArgs:
    """The memory plan (`--dry-run`): print it and exit, nothing written or loaded."""

    dry_run: bool = False
    """Print what one device will hold (parameters, weights, gradients, optimizer state, frozen
    models, activations with and without checkpointing) and exit without training."""
    gpu_memory: float | None = None
    """Memory of one device in GB to check the plan against; default: the visible CUDA
    device's."""

    def __post_init__(self) -> None:
        if self.gpu_memory is not None and not self.gpu_memory > 0:
            raise UsageError(f"--gpu_memory must be > 0 GB, got {self.gpu_memory}")


@dataclass
class MemoryPlan:
    """Bytes per device of each part of a training run."""

    params: int
    trainable: int
    processes: int
    sharded: bool
    weights: int
    gradients: int
    optimizer: int
    frozen: int
    activations: int
    activations_checkpointed: int
    checkpointing: bool

    def total(self) -> int:
        act = self.activations_checkpointed if self.checkpointing else self.activations
        return self.weights + self.gradients + self.optimizer + self.frozen + act

    def render(self, device_bytes: int | None) -> str:
        def gib(n: int) -> str:
            return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / 2**20:,.1f} MiB"

        where = f"{self.processes} process(es)" + (", FSDP2-sharded" if self.sharded else "")
        lines = [
            f"memory plan per device ({where}):",
            f"  parameters        {self.params:,} ({self.trainable:,} trainable,"
            f" {self.params - self.trainable:,} frozen)",
            f"  weights           {gib(self.weights)}",
            f"  gradients         {gib(self.gradients)}",
            f"  optimizer state   {gib(self.optimizer)}",
            f"  frozen models     {gib(self.frozen)}",
            f"  activations       {gib(self.activations)} per step without checkpointing,"
            f" {gib(self.activations_checkpointed)} with"
            + (" (--gradient_checkpointing true: the latter counts)" if self.checkpointing else ""),
            f"  total             {gib(self.total())}",
        ]
        if device_bytes is None:
            lines.append(
                "  fits              not judged: no CUDA device visible; give --gpu_memory GB"
            )
        else:
            verdict = "yes" if self.total() <= device_bytes else "NO"
            lines.append(f"  fits in {gib(device_bytes)}: {verdict}")
        return "\n".join(lines)


def _config_sizes(config) -> tuple[int, int, int, int, bool]:
    """(hidden, mlp width, blocks, vocabulary, gated MLP) from an HF config."""
    hidden = config.hidden_size
    width = getattr(config, "intermediate_size", None) or 4 * hidden
    blocks = config.num_hidden_layers
    gated = getattr(config, "hidden_act", "") in ("silu", "swish") or "llama" in config.model_type
    return hidden, width, blocks, config.vocab_size, gated


def activation_bytes(
    config, tokens: int, compute_bytes: int, micro_batches: int
) -> tuple[int, int]:
    """(without, with) checkpointing: bytes autograd keeps for one step of `micro_batches`
    micro-batches of `tokens` tokens each (module docstring)."""
    hidden, width, blocks, vocab, gated = _config_sizes(config)
    per_block = (16 * hidden + (4 if gated else 3) * width) * tokens * compute_bytes
    logits = 3 * vocab * tokens * 4
    plain = micro_batches * (blocks * per_block + logits)
    kept = micro_batches * (blocks * hidden * tokens * compute_bytes + logits) + per_block
    return plain, kept


def plan_memory(model, tcfg, lora, processes: int, micro_batches: int = 2) -> MemoryPlan:
    """The plan for training `model` (built on the meta device: `models.refs.meta_model`) with
    TrainConfig `tcfg` and LoraSettings `lora` over `processes` processes."""
    from unlearn.models.lora import attach_lora
    from unlearn.training.optim import describe_routing

    params = sum(p.numel() for p in model.parameters())
    trained = attach_lora(copy.deepcopy(model), lora) if lora.lora else model
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    if not lora.lora:
        trainable = params
    weight_bytes = BYTES[tcfg.dtype]
    shards = processes if tcfg.distributed == "fsdp2" else 1
    weights = params * weight_bytes
    if lora.lora:
        weights += trainable * weight_bytes  # the adapters, beside the frozen base weights
    optimizer = trainable * 2 * weight_bytes  # AdamW's two moments
    if tcfg.optimizer == "muon":
        routing = describe_routing(trained, "muon")
        muon = sum(p.numel() for n, p in trained.named_parameters()
                   if n in set(routing["muon"]["names"]))  # fmt: skip
        optimizer = (muon * 1 + (trainable - muon) * 2) * weight_bytes  # Muon: one buffer
    frozen = 0
    if not lora.lora:
        mixed_bf16 = tcfg.distributed == "fsdp2" and tcfg.mixed_precision != "no"
        frozen = params * (2 if mixed_bf16 else weight_bytes)
    compute = 2 if tcfg.mixed_precision != "no" else weight_bytes
    tokens = tcfg.pdbs * tcfg.max_length
    plain, kept = activation_bytes(model.config, tokens, compute, micro_batches)
    return MemoryPlan(
        params=params,
        trainable=trainable,
        processes=processes,
        sharded=shards > 1,
        weights=math.ceil(weights / shards),
        gradients=math.ceil(trainable * weight_bytes / shards),
        optimizer=math.ceil(optimizer / shards),
        frozen=frozen,
        activations=plain,
        activations_checkpointed=kept,
        checkpointing=tcfg.gradient_checkpointing,
    )


def device_memory(args: PlanArgs) -> int | None:
    """Bytes of one device: --gpu_memory, else the visible CUDA device's, else None."""
    if args.gpu_memory is not None:
        return int(args.gpu_memory * 1e9)
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None
