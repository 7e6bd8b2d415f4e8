"""Data-parallel training and evaluation under torchrun: DDP and FSDP2, with torch.distributed only.

    torchrun --nproc_per_node=4 -m unlearn run --method lens --world W --out R --distributed fsdp2

`Parallel` is everything the training loop, the recipes and the evaluator need to know about the
process group: rank, world size, how to run one micro-batch's objective, how to accumulate
gradients, how to reduce logged values and how to save. With `--distributed none` it is a no-op,
so the single-process path is the same code.

Design choices:
- The process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR/PORT): NCCL on CUDA (one GPU per local rank), gloo on the CPU. Started without
  torchrun, a ddp/fsdp2 run is a one-process group (an in-memory store), so the same wrappers are
  exercised with one process as with N.
- Data: every rank builds the same deterministic `ExampleStream`s and draws global micro-batch
  k = (step * accum + a) * world + rank, so N processes with accumulation A see exactly the
  micro-batches of 1 process with accumulation N * A.
- Loss normalisation: the training objective of a step is the mean over its micro-batches of each
  micro-batch's masked token means (each micro-batch counts equally, as in the one-process loop
  where a micro-batch's loss is divided by the accumulation). DDP and FSDP2 average gradients over
  ranks, so mean over ranks of (mean over accumulation) is exactly that mean over all N * A
  micro-batches: no token-count rescaling is needed, and one that weighted micro-batches by their
  token counts would change the objective relative to one process. Logged values are averaged the
  same way (an all-reduce of the per-rank accumulation means) before guards and logging, so every
  rank takes the same divergence decision.
- DDP wraps a small module whose forward runs the whole objective of one micro-batch (all its
  forwards: trained model, reference, early-stopped activation passes). DDP then sees exactly one
  forward per backward, and `find_unused_parameters` finds the parameters that a loss did not
  reach (blocks above a stopped forward, the unembedding under an L2 retain term) from the
  returned loss graph. Methods still get the plain model, so hooks work as in one process.
- FSDP2 (`fully_shard`) shards every transformer block (hooks.get_blocks), then the root (the HF
  or PEFT model: embeddings, final norm, unembedding). The root is kept unsharded from the start
  of a micro-batch until its backward (`reshard_after_forward=False` plus an explicit `unshard`),
  because the lens method calls the final norm and the unembedding directly, outside any root
  forward. Block hooks (capture, replace_output, early stop) are ordinary forward hooks that run
  after FSDP's own; run_above's temporary block forwards run inside FSDP's hooks. Muon needs
  whole matrices, so it is refused with FSDP2.
- Frozen models (full fine-tuning's reference copy, checkpoint transfer's source, lenses) are
  plain per-rank copies, never wrapped: they take no gradients. With LoRA the reference is the
  wrapped model with its adapters disabled, as in one process.
- Gradient accumulation skips the gradient all-reduce / reduce-scatter on all but the last
  micro-batch of a step (DDP `no_sync`, FSDP2 `set_requires_gradient_sync(False)`).
- Saving: FSDP2 gathers a full state dict on CPU (`get_model_state_dict(full_state_dict=True,
  cpu_offload=True)`); rank 0 loads it into a freshly built unsharded model (re-attaching the LoRA
  adapters) and writes it with `unlearn.models.save.save_model` (atomic, merged if asked). Under
  DDP every rank already holds the full model; rank 0 writes it.
- Watchdog: the process group's timeout (`--collective_timeout`, default 300 s) ends a
  collective that waits longer, instead of hanging forever when ranks took different paths or
  one died; the loop reports it as `CollectiveFailure` (one line naming the rank and the step,
  status failed). Waits where rank 0 legitimately works alone for long (fitting lenses and
  affine maps, writing or verifying a checkpoint, saving the model) go through a second, gloo
  group with a long timeout (`SLOW_WAIT`), so a big model's save is not taken for a hang. On
  NCCL, torch's own watchdog enforces the same timeout and tears the process down with a log
  line naming the rank (TORCH_NCCL_ASYNC_ERROR_HANDLING's default).
- Frozen forwards under FSDP2: the LoRA reference is the sharded model, so its forward is a
  collective; the frozen cache makes every rank run as many as the rank that missed most
  (`Parallel.forwards_are_collective`, `frozen_cache.FrozenCache.agree`).
- Only rank 0 writes: the run directory (`runs.rundir.FollowerRunDir` keeps the other ranks'
  run.json in memory), the store, progress bars and printed plans.
- Evaluation: the native evaluator builds the same rows and batches on every rank and shares the
  *batches* out round-robin (`map_sharded`), padding every rank to the same count: FSDP2 needs
  every rank to run the same number of forwards, and a question is 1 row or one per choice, so
  equal question counts would not do. The per-batch scores are gathered with
  `all_gather_object`, so the task metrics come from the same numbers (same batches) as in one
  process.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from unlearn.errors import CollectiveFailure, UsageError
from unlearn.models import save as model_save
from unlearn.models.load import default_device
from unlearn.models.lora import is_peft
from unlearn.readouts.hooks import get_blocks

MODES = ("none", "ddp", "fsdp2")
DEFAULT_TIMEOUT_S = 300.0
"""Default --collective_timeout: longer than any matched collective of a training step waits."""
SLOW_WAIT = datetime.timedelta(hours=12)
"""Timeout of the waits where rank 0 works alone (lens fitting, checkpoint and model writes)."""

T = TypeVar("T")
R = TypeVar("R")


def env_world_size() -> int:
    """Processes launched together (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the running process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that prints and writes."""
    return rank() == 0


def check_mode(mode: str) -> None:
    """Validate --distributed before anything loads (UsageError with one line)."""
    if mode not in MODES:
        raise UsageError(f"unknown --distributed {mode!r} (choose from {', '.join(MODES)})")


def _init_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        # Not under torchrun: a one-process group, so --distributed ddp/fsdp2 still runs the
        # wrapped code path (and equals the N-process run on the same global batch).
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    atexit.register(_destroy)


_SLOW_GROUP: list = []


def slow_group():
    """A gloo group over every rank with a long timeout (`SLOW_WAIT`), for waits on rank 0's
    solitary work; created on first use, which every rank reaches at the same collective."""
    if not _SLOW_GROUP:
        _SLOW_GROUP.append(dist.new_group(backend="gloo", timeout=SLOW_WAIT))
    return _SLOW_GROUP[0]


_BACKEND_FAILURE = re.compile(
    r"timed out|connection closed|connection reset|broken pipe|\bgloo\b|\bnccl\b", re.IGNORECASE
)


def collective_failure(
    error: BaseException, where: str, timeout_s: float | None = None
) -> CollectiveFailure | None:
    """The one-line `CollectiveFailure` for an error a collective raised (a timeout, a peer
    that died), None for anything else. gloo raises plain RuntimeErrors, so the backend's
    message is what tells them apart."""
    if isinstance(error, CollectiveFailure) or not active():
        return None
    backend = isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and _BACKEND_FAILURE.search(str(error)) is not None
    )
    if not backend:
        return None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # the backend's source location
    limit = f" (--collective_timeout {timeout_s:g} s)" if timeout_s is not None else ""
    return CollectiveFailure(
        f"rank {rank()}: a collective failed {where}{limit}: {first}; the ranks took different"
        " paths, or another rank died or hangs (see its output)"
    )


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _ObjectiveModule(nn.Module):
    """What DDP wraps: a forward that runs one micro-batch's objective on the inner model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return compute()


@dataclass
class Parallel:
    """The process group as the loop and the recipes see it (mode none: one plain process)."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = DEFAULT_TIMEOUT_S
    """The process group's collective timeout (--collective_timeout), named in failures."""
    _ddp: nn.Module | None = None
    _root: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def forwards_are_collective(self) -> bool:
        """Whether a forward of the trained model (also as the LoRA reference, adapters
        disabled) runs collectives: FSDP2's all-gathers, with more than one process. Then every
        rank must run the same number of them."""
        return self.mode == "fsdp2" and self.world_size > 1

    def wrap(self, model: nn.Module, mixed_precision: str = "no") -> nn.Module:
        """Wrap the trained model for gradients (DDP) or shard it in place (FSDP2).

        Returns the module the methods use (the model itself in every mode); call it after
        anything that reads whole weights (method setup: lens or affine fitting). Under FSDP2,
        `mixed_precision` (bf16) becomes its mixed-precision policy: parameters gathered in the
        compute dtype, gradients reduced in float32, the sharded master weights in float32.
        """
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(
                _ObjectiveModule(model),
                device_ids=device_ids,
                find_unused_parameters=True,
            )
        elif self.mode == "fsdp2":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy()
            if mixed_precision == "bf16":
                policy = MixedPrecisionPolicy(
                    param_dtype=torch.bfloat16, reduce_dtype=torch.float32
                )
            for block in get_blocks(model):
                fully_shard(block, mp_policy=policy)
            fully_shard(model, reshard_after_forward=False, mp_policy=policy)
            self._root = model
        return model

    def loss(self, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Run one micro-batch's objective (`compute` does the forwards and returns the terms)."""
        if self._ddp is not None:
            return self._ddp(compute)
        if self._root is not None:
            self._root.unshard()  # type: ignore[operator]
        return compute()

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Forward + backward of one micro-batch; gradients are synchronised on the last only."""
        if self._ddp is not None and not last:
            with self._ddp.no_sync():  # type: ignore[operator]
                yield
            return
        if self._root is not None:
            self._root.set_requires_gradient_sync(last)  # type: ignore[operator]
        yield

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average logged values over ranks (each rank's value is its accumulation mean)."""
        if self.world_size == 1 or not values:
            return values
        names = sorted(values)
        t = torch.tensor([values[n] for n in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {n: float(v) / self.world_size for n, v in zip(names, t.tolist(), strict=True)}

    def collective_failure(self, error: BaseException, where: str) -> CollectiveFailure | None:
        """`collective_failure` with this group's timeout (None: not a collective's error)."""
        return collective_failure(error, where, self.timeout_s)

    @contextlib.contextmanager
    def naming_failures(self, where: str) -> Iterator[None]:
        """Turn a collective's timeout or lost peer inside the block into one
        `CollectiveFailure` line naming this rank and `where` (e.g. "at step 14")."""
        try:
            yield
        except RuntimeError as error:
            failure = self.collective_failure(error, where)
            if failure is None:
                raise
            raise failure from error

    def frozen_forwards_agreement(self) -> Callable[[int], int] | None:
        """What the frozen cache needs to keep the ranks' frozen forwards matched
        (`FrozenCache.agree`): the all-reduced maximum where forwards are collectives."""
        return self.max if self.forwards_are_collective else None

    def max(self, value: int) -> int:
        """The largest of the ranks' `value`s (every rank gets it)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def item(self, value: torch.Tensor | float) -> float:
        """A Python float of a tensor that may be an FSDP2 DTensor (e.g. the gradient norm)."""
        if isinstance(value, torch.Tensor):
            full = getattr(value, "full_tensor", None)
            return float(full() if full is not None else value)
        return float(value)

    def barrier(self) -> None:
        """Wait for every rank, without the collective timeout (rank 0 may be writing or
        fitting alone for a long time meanwhile: `slow_group`)."""
        if self.enabled and self.world_size > 1:
            dist.barrier(group=slow_group())

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fits and caches a lens), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def save_model(
        self,
        model: nn.Module,
        tokenizer,
        out_dir: str | os.PathLike,
        merge: bool = True,
        extra_files: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """Save like `unlearn.models.save.save_model` (rank 0 writes, atomically); returns the
        paths.

        A failed save (disk full) raises on every rank: rank 0 tells the others, which would
        otherwise wait for it at the next collective forever.
        """

        out_dir = Path(out_dir)
        if self._root is not None:
            model = self._gather_full_model(model)
        error: BaseException | None = None
        if self.is_main:
            try:
                paths = model_save.save_model(model, tokenizer, out_dir, merge, extra_files)
            except Exception as e:
                if not self.enabled or self.world_size == 1:
                    raise
                error = e
        else:
            paths = {"adapter": str(out_dir / "adapter")} if is_peft(model) else {}
            if merge or not paths:
                paths["model"] = str(out_dir / "model")
        if self.enabled and self.world_size > 1:
            message = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(message, src=0, group=slow_group())
            if error is not None:
                raise error
            if message[0] is not None:
                raise OSError(f"rank 0 could not save the model: {message[0]}")
        return paths

    def _gather_full_model(self, model: nn.Module) -> nn.Module:
        """The FSDP2 model's full weights in a fresh unsharded model on rank 0 (CPU)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)  # every rank must take part
        if not self.is_main:
            return model
        full = _empty_like(model)
        full.load_state_dict(state)
        return full


def _empty_like(model: nn.Module) -> nn.Module:
    """A new CPU model of the same architecture (and LoRA adapters) as `model`, to load weights."""
    from transformers import AutoModelForCausalLM

    dtype = next(iter(model.parameters())).dtype
    if not is_peft(model):
        return AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=dtype)
    from peft import get_peft_model

    base_model = model.get_base_model()  # type: ignore[operator]
    base = AutoModelForCausalLM.from_config(copy.deepcopy(base_model.config), dtype=dtype)
    return get_peft_model(base, copy.deepcopy(model.peft_config["default"]))  # type: ignore[index]


def setup(mode: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Parallel:
    """The Parallel of this process: joins (or starts) the process group for ddp/fsdp2, whose
    collectives fail after `timeout_s` seconds of waiting instead of hanging.

    Launched by torchrun on several processes without --distributed, every process would train
    its own copy and write the same run directory, so that is refused.
    """
    check_mode(mode)
    if mode == "none":
        if env_world_size() > 1:
            raise UsageError(
                f"launched on {env_world_size()} processes: pass --distributed ddp or fsdp2"
            )

        return Parallel(device=default_device())
    _init_process_group(timeout_s)
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Parallel(mode, dist.get_rank(), dist.get_world_size(), device, timeout_s)


def join_for_evaluation(backend: str = "native") -> None:
    """Join torchrun's process group when launched on several processes (`unlearn eval`): the
    native evaluator then shards its batches over the ranks (`map_sharded`)."""
    if env_world_size() == 1:
        return
    if backend == "lm-eval":
        raise UsageError(
            f"data-parallel evaluation under torchrun supports the native backend, not {backend}"
        )
    _init_process_group()


def map_sharded(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`[fn(item) for item in items]` in data parallel, results gathered in order on every rank.

    Rank r calls `fn` on items r, r + world, ...; a rank with one item fewer calls it once more
    on the last item (result dropped), so every rank makes exactly ceil(len / world) calls. The
    evaluator maps over *batches*, one forward each: under FSDP2 a forward is a collective, and
    ranks that run different numbers of them hang or fail with a collective mismatch.
    """
    if not active():
        return [fn(item) for item in items]
    world, me = dist.get_world_size(), dist.get_rank()
    per_rank = -(-len(items) // world)
    mine = list(range(me, len(items), world))
    results = [fn(items[i]) for i in mine]
    for _ in range(per_rank - len(mine)):
        fn(items[-1])  # padding: the same forwards as the other ranks, result dropped
    gathered: list[list] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, list(zip(mine, results, strict=True)))
    by_index = dict(pair for part in gathered for pair in part)
    return [by_index[i] for i in range(len(items))]
