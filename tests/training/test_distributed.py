"""Data parallelism (unlearn.distributed): world-size equivalence on CPU/gloo, sharded evaluation.

The equivalence tests train a tiny random GPT-NeoX for a few steps on examples of unequal
lengths: once in this process with accumulation 2A, once on 2 spawned processes with
accumulation A (DDP, FSDP2). Same global batch, so the logged losses and the saved weights must
agree to float tolerance. Every method runs: sequential (frozen reference, block-output
replacement, early-stopped forwards, two phases), lens (the frozen original's final norm and
unembedding called outside any forward, L2 retain) and checkpoint transfer (a per-rank source
model and affine maps, KL retain); their lenses and maps are seeded random ones (tiny_methods).
"""

from __future__ import annotations

import copy
import datetime
import json
import socket
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_gpt_neox
from unlearn.config.settings import TrainConfig
from unlearn.distributed import MODES, Parallel, check_mode, map_sharded, setup
from unlearn.errors import UsageError

STEPS_PER_PHASE = 2
LR = 1e-2
LOSS_TOLERANCE = 1e-5
"""Largest allowed |difference| of a logged value between world sizes, relative to max(1,
|value|): float32 sums in another order (measured: 3e-8 DDP, 5e-7 FSDP2 on O(1-10) losses; a
grad norm of 50 differed by 1.1e-5, 2.3e-7 of it)."""


def _close(a: float, b: float) -> bool:
    return abs(a - b) < LOSS_TOLERANCE * max(1.0, abs(a))


WEIGHT_TOLERANCE = LR / 100
"""Largest allowed |difference| of a saved weight: Adam divides by sqrt(v), so a summation-order
difference in a near-zero gradient moves a weight by a visible fraction of one step (measured:
about 1e-5 after 4 steps at lr 1e-2)."""


class _NoTokenizer:
    """save_model writes the tokenizer beside the weights; the tiny model has none."""

    def save_pretrained(self, path) -> None:
        return None


def _tiny_model():
    return tiny_gpt_neox(4)


def _examples(seed: int) -> list[list[int]]:
    # Unequal lengths: micro-batches hold different numbers of valid tokens.
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 17, (24,), generator=g).tolist()
    return [torch.randint(1, 64, (n,), generator=g).tolist() for n in lengths]


def _method(name: str, model, reference):
    """The method set up on the (unwrapped) model, with coefficients that make both terms count."""
    from tiny_methods import lens_method, transfer_method
    from unlearn.methods.checkpoint_transfer import CheckpointTransferConfig
    from unlearn.methods.lens import LensConfig
    from unlearn.methods.sequential import Sequential, SequentialConfig

    coefs = {"retain_coef": 2.0, "remove_coef": 1.0}
    if name == "lens":
        with reference.use() as original:
            return lens_method(model, original, LensConfig(**coefs))
    if name == "checkpoint_transfer":
        return transfer_method(model, CheckpointTransferConfig(**coefs))
    method = Sequential(SequentialConfig(**coefs))
    method.setup(model, None)  # type: ignore[arg-type]
    return method


FROZEN_KEY = {"model": {"name": "tiny-gpt-neox"}, "dtype": "float32", "device": "cpu"}
"""The tiny original's identity in the frozen cache (what `frozen_cache.frozen_key` gives a
real model)."""


def _train_tiny(
    rank: int,
    world: int,
    mode: str,
    accum: int,
    lora: bool,
    out: str,
    method: str = "sequential",
    steps: int = STEPS_PER_PHASE,
    cache_dir: str | None = None,
    wrap_objective=None,
    timeout_s: float = 60.0,
    checkpointer=None,
    gradient_checkpointing: bool = False,
    mixed_precision: str = "no",
    optimizer: str = "adamw",
) -> dict[str, int]:
    """Train the tiny model; rank 0 writes losses.json and the saved model under `out`. With
    `cache_dir`, frozen outputs go through a frozen cache there (this process's memory emptied
    first, so what it holds is what the directory holds); returns its hits and misses.
    `wrap_objective(objective, par)` may replace the objective (to make ranks diverge);
    `timeout_s` is the process group's collective timeout, as the worker set it."""
    from unlearn.config.settings import LoraSettings
    from unlearn.data import ExampleStream
    from unlearn.methods.base import Reference
    from unlearn.models.lora import attach_lora
    from unlearn.training import frozen_cache
    from unlearn.training.loop import make_plan, train
    from unlearn.training.precision import match_frozen_copy

    torch.set_num_threads(1)
    model = _tiny_model()
    if gradient_checkpointing:
        from unlearn.models.gradient_checkpointing import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    key = FROZEN_KEY if cache_dir else None
    if lora:
        torch.manual_seed(1)  # the same adapter initialisation on every rank and world size
        model = attach_lora(model, LoraSettings(lora_r=4, lora_dropout=0.0))
        reference = Reference(model, key=key)
    else:
        frozen = match_frozen_copy(copy.deepcopy(model), mixed_precision, mode)
        reference = Reference(model, frozen_copy=frozen, key=key)
        model.requires_grad_(True)
    objective = _method(method, model, reference)
    if key is not None and method == "checkpoint_transfer":
        objective.source_key = {**FROZEN_KEY, "model": {"name": "tiny-source"}}
    cfg = TrainConfig(lr=LR, pdbs=2, grad_accum=accum, max_steps=steps, distributed=mode,
                      mixed_precision=mixed_precision, optimizer=optimizer)  # fmt: skip
    par = Parallel(mode, rank, world, timeout_s=timeout_s)
    par.wrap(model, mixed_precision)
    if wrap_objective is not None:
        objective = wrap_objective(objective, par)
    cache = None
    if cache_dir is not None:
        frozen_cache.MEMORY.clear()
        cache = frozen_cache.FrozenCache(cache_dir)
        cache.agree = par.frozen_forwards_agreement()
    forget = ExampleStream(_examples(1), cfg.pdbs, 0, seed=0)
    retain = ExampleStream(_examples(2), cfg.pdbs, 0, seed=1)
    plan = make_plan(cfg, 24, objective.phases, world)
    rows: list[dict] = []
    train(
        model,
        objective,
        reference,
        forget,
        retain,
        cfg,
        plan,
        on_log=lambda step, values: rows.append({"step": step, **values}),
        progress=False,
        parallel=par,
        frozen_cache=cache,
        checkpointer=checkpointer,
    )
    par.save_model(model, _NoTokenizer(), out, merge=True)
    if rank == 0:
        (Path(out) / "losses.json").write_text(json.dumps(rows))
    return {"hits": cache.hits, "misses": cache.misses} if cache is not None else {}


def _worker(
    rank: int,
    world: int,
    port: int,
    mode: str,
    accum: int,
    lora: bool,
    out: str,
    method: str,
    options: dict | None = None,
) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        _train_tiny(rank, world, mode, accum, lora, out, method, **(options or {}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(
    mode: str, accum: int, lora: bool, out: Path, method: str, options: dict | None = None
) -> None:
    import torch.multiprocessing as mp

    # fork: the children inherit the imported modules (spawn would re-import torch and
    # transformers in each, several seconds on a small machine).
    args = (2, _free_port(), mode, accum, lora, str(out), method, options)
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="fork")


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """The saved model's weights, loaded back as an HF model (the save is a usable model dir)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out / "model").state_dict()


def _max_differences(
    a: Path, b: Path, steps_per_phase: int = STEPS_PER_PHASE
) -> tuple[float, float]:
    """Largest |difference| over every logged value (relative to max(1, |value|)) and over
    every saved weight."""
    la, lb = (json.loads((d / "losses.json").read_text()) for d in (a, b))
    # Sequential has two phases of `steps_per_phase` steps, the other methods one.
    steps = [r["step"] for r in la]
    phases = (list(range(1, steps_per_phase + 1)), list(range(1, 2 * steps_per_phase + 1)))
    assert steps == [r["step"] for r in lb] and steps in phases
    loss_diff = max(
        abs(ra[k] - rb[k]) / max(1.0, abs(ra[k])) for ra, rb in zip(la, lb, strict=True) for k in ra
    )
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    weight_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    return loss_diff, weight_diff


def _equivalence(tmp_path: Path, mode: str, lora: bool, method: str = "sequential") -> None:
    one, two = tmp_path / "one", tmp_path / f"two-{mode}"
    _train_tiny(0, 1, "none", accum=4, lora=lora, out=str(one), method=method)
    _spawn(mode, accum=2, lora=lora, out=two, method=method)
    loss_diff, weight_diff = _max_differences(one, two)
    assert loss_diff < LOSS_TOLERANCE and weight_diff < WEIGHT_TOLERANCE, (loss_diff, weight_diff)
    # The run really trained: the weights moved away from the initial model.
    initial = _tiny_model().state_dict()
    moved = max(float((w - initial[k]).abs().max()) for k, w in _weights(one).items())
    assert moved > 1e-3


def test_ddp_two_processes_equal_one_process(tmp_path):
    _equivalence(tmp_path, "ddp", lora=False)


def test_fsdp2_two_processes_equal_one_process(tmp_path):
    _equivalence(tmp_path, "fsdp2", lora=False)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_gradient_checkpointing_under_data_parallelism_changes_nothing(tmp_path, mode):
    """Two checkpointing processes (LoRA: adapters must still get gradients through recomputed
    blocks) equal one process without checkpointing."""
    one, two = tmp_path / "one", tmp_path / f"two-{mode}"
    _train_tiny(0, 1, "none", accum=4, lora=True, out=str(one))
    _spawn(mode, accum=2, lora=True, out=two, method="sequential",
           options={"gradient_checkpointing": True})  # fmt: skip
    loss_diff, weight_diff = _max_differences(one, two)
    assert loss_diff < LOSS_TOLERANCE and weight_diff < WEIGHT_TOLERANCE, (loss_diff, weight_diff)


def test_fsdp2_bf16_policy_stays_within_bf16_rounding_of_float32(tmp_path):
    """FSDP2's mixed-precision policy (bf16 parameters, float32 reductions) under autocast, with
    the frozen reference stored in bf16 like the parameters it is compared with: the retain term
    starts at exactly 0, and every logged value stays within bf16's rounding of one float32
    process."""
    one, two = tmp_path / "one", tmp_path / "two-fsdp2"
    _train_tiny(0, 1, "none", accum=4, lora=False, out=str(one))
    _spawn("fsdp2", accum=2, lora=False, out=two, method="sequential",
           options={"mixed_precision": "bf16"})  # fmt: skip
    rows = json.loads((two / "losses.json").read_text())
    assert rows[0]["retain"] == 0.0
    # Every loss term and the gradient norm at every step (measured: 0.7% at most). Weights are
    # not compared: Adam's normalised step turns a rounding-sized gradient change into a full
    # step of either sign for a near-zero gradient.
    loss_diff, _ = _max_differences(one, two)
    assert loss_diff < 2e-2, loss_diff
    assert {w.dtype for w in _weights(two).values()} == {torch.float32}  # float32 master weights


def _sharded_muon_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from unlearn.training.sharded_muon import ShardedMuon

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    try:
        torch.manual_seed(0)
        w, grads = torch.randn(10, 6), [torch.randn(10, 6) for _ in range(3)]  # 10 rows: 5 + 5
        whole = torch.nn.Parameter(w.clone())
        plain = torch.optim.Muon([whole], lr=0.01, adjust_lr_fn="match_rms_adamw")
        mesh = init_device_mesh("cpu", (2,))
        shard = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
        sharded = ShardedMuon([shard], lr=0.01, adjust_lr_fn="match_rms_adamw")
        for g in grads:
            whole.grad = g.clone()
            plain.step()
            shard.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            sharded.step()
        gathered = shard.full_tensor()
        if rank == 0:
            torch.save({"sharded": gathered, "whole": whole.detach()}, out)
    finally:
        dist.destroy_process_group()


def test_sharded_muon_steps_exactly_as_torch_muon_on_the_whole_matrix(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "muon.pt"
    mp.start_processes(_sharded_muon_worker, args=(_free_port(), str(out)), nprocs=2,
                       join=True, start_method="fork")  # fmt: skip
    result = torch.load(out)
    assert torch.equal(result["sharded"], result["whole"])
    assert not torch.equal(result["whole"], torch.zeros(0))


MUON_LOSS_TOLERANCE, MUON_WEIGHT_TOLERANCE = 1e-3, 5e-3
"""Muon's Newton-Schulz iteration runs in bf16 (torch's own), so a summation-order difference
in a gradient flips bf16 roundings of its update, and later steps carry them on (measured
against one process after 4 steps: DDP 1.6e-5 / 1.0e-3, FSDP2 3.2e-4 / 2.3e-3 in logged values
/ weights). The optimizer itself is exact on shards: the test above."""


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp2_muon_two_processes_follow_one_process(tmp_path, lora):
    """Muon orthogonalises whole matrices: under FSDP2 each sharded matrix's update is gathered,
    orthogonalised and sliced back (ShardedMuon), so two processes follow one."""
    one, two = tmp_path / "one", tmp_path / "two-fsdp2"
    _train_tiny(0, 1, "none", accum=4, lora=lora, out=str(one), optimizer="muon")
    _spawn("fsdp2", accum=2, lora=lora, out=two, method="sequential",
           options={"optimizer": "muon"})  # fmt: skip
    loss_diff, weight_diff = _max_differences(one, two)
    assert loss_diff < MUON_LOSS_TOLERANCE, loss_diff
    assert weight_diff < MUON_WEIGHT_TOLERANCE, weight_diff
    initial = _tiny_model().state_dict()
    moved = max(float((w - initial[k]).abs().max()) for k, w in _weights(one).items())
    assert moved > 3 * MUON_WEIGHT_TOLERANCE  # beyond the tolerance: the run trained


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_lora_world_size_equivalence(tmp_path, mode):
    """LoRA: the reference is the wrapped model with adapters disabled; the merged save gathers."""
    _equivalence(tmp_path, mode, lora=True)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize(("method", "lora"), [("lens", True), ("checkpoint_transfer", False)])
def test_lens_and_transfer_world_size_equivalence(tmp_path, mode, method, lora):
    """Each in its default training mode: lens with LoRA (its read-out runs through the wrapped
    model's own final norm and unembedding, adapters disabled), checkpoint transfer with full
    fine-tuning (frozen copy as the reference, a source model on every rank)."""
    _equivalence(tmp_path, mode, lora=lora, method=method)


CACHE_STEPS = 4
"""Steps per phase of the frozen-cache runs: 4 x 8 examples per step = 32 drawn of 24, so the
runs go past one pass over the data (examples repeat: cache hits on both ranks, at different
micro-batches on each)."""


def _cache_worker(
    rank: int, world: int, port: int, mode: str, lora: bool, method: str, root: str
) -> None:
    """The same run with an empty frozen cache (cold), the full cache it left (full), and a
    cache half filled by a shorter earlier run (fill, then partial); writes each rank's hits
    and misses."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        root_path = Path(root)
        counts = {}
        for name, cache, steps in (
            ("cold", "cache-a", CACHE_STEPS),
            ("full", "cache-a", CACHE_STEPS),
            ("fill", "cache-b", 2),  # step 1 computes live: step 2 fills
            ("partial", "cache-b", CACHE_STEPS),
        ):
            counts[name] = _train_tiny(rank, world, mode, 2, lora, str(root_path / name), method,
                                       steps, str(root_path / cache))  # fmt: skip
        (root_path / f"counts-rank{rank}.json").write_text(json.dumps(counts))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize(
    ("method", "lora"), [("lens", True), ("sequential", True), ("checkpoint_transfer", True)]
)
def test_frozen_cache_under_data_parallelism(tmp_path, mode, method, lora):
    """Two processes past one pass over the data, with an empty, a full and a partly warm frozen
    cache: every run finishes (under FSDP2 with LoRA the reference's frozen forward is the
    sharded model's collective, and ranks miss different examples) and reaches the uncached
    one-process run's losses and weights."""
    import torch.multiprocessing as mp

    plain = tmp_path / "plain"
    _train_tiny(0, 1, "none", 4, lora, str(plain), method, CACHE_STEPS)
    args = (2, _free_port(), mode, lora, method, str(tmp_path))
    mp.start_processes(_cache_worker, args=args, nprocs=2, join=True, start_method="fork")
    for name in ("cold", "full", "partial"):
        loss_diff, weight_diff = _max_differences(plain, tmp_path / name, CACHE_STEPS)
        assert loss_diff < LOSS_TOLERANCE and weight_diff < WEIGHT_TOLERANCE, (
            name, loss_diff, weight_diff)  # fmt: skip
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"counts-rank{rank}.json").read_text())
        cold, full, partial = counts["cold"], counts["full"], counts["partial"]
        assert cold["misses"] > 0 and cold["hits"] > 0  # examples repeat within the run
        assert full["misses"] == 0 and full["hits"] == cold["hits"] + cold["misses"]
        assert counts["fill"]["misses"] > 0 and 0 < partial["misses"] < cold["misses"]


class _StallingRank:
    """An objective whose rank 1 stops before its second step until `release` exists (a hung
    rank, as when ranks take different paths), bounded by a deadline."""

    def __init__(self, inner, par: Parallel, release: Path) -> None:
        self.inner, self.par, self.release = inner, par, release

    @property
    def phase(self):
        return self.inner.phase

    @phase.setter
    def phase(self, value) -> None:
        self.inner.phase = value

    def phases(self, steps: int):
        return self.inner.phases(steps)

    def weights(self, step: int, total: int):
        return self.inner.weights(step, total)

    def loss(self, ctx):
        if self.par.rank == 1 and ctx.step == 1:
            import time

            deadline = time.monotonic() + 60
            while not self.release.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return self.inner.loss(ctx)


def _stalling_worker(rank: int, world: int, port: int, root: str) -> None:
    import contextlib
    import io

    import torch.distributed as dist

    from unlearn.runs.lifecycle import run_lifecycle
    from unlearn.runs.rows import RunMeta

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=2))  # fmt: skip
    root_path = Path(root)
    release = root_path / "release"
    stderr = io.StringIO()
    try:
        par = Parallel("fsdp2", rank, world, timeout_s=2)  # the lifecycle's view of the group
        fresh = RunMeta(id="stall", kind="unlearn", method="sequential", status="running")
        with contextlib.redirect_stderr(stderr), run_lifecycle(fresh, root_path / "run", par):
            _train_tiny(rank, world, "fsdp2", 2, True, str(root_path / "out"), steps=4,
                        wrap_objective=lambda objective, par: _StallingRank(objective, par,
                                                                            release),
                        timeout_s=2)  # fmt: skip
    finally:
        (root_path / f"stderr-rank{rank}.txt").write_text(stderr.getvalue())
        release.touch()  # rank 0 has failed and said so: let rank 1 go on (and fail too)


def test_a_stalled_rank_fails_the_run_in_one_line_instead_of_hanging(tmp_path):
    """A collective that waits past the process group's timeout (here 2 s) ends the run: each
    rank says in one line which rank and which step, and the run is marked failed."""
    import torch.multiprocessing as mp

    from unlearn.runs.rundir import RunDir

    args = (2, _free_port(), str(tmp_path))
    mp.start_processes(_stalling_worker, args=args, nprocs=2, join=True, start_method="fork")
    meta = RunDir(tmp_path / "run").read_meta()
    assert meta.status == "failed" and meta.finished is not None
    assert meta.error.startswith("rank 0: a collective failed at step 2 (--collective_timeout 2 s)")
    for rank in (0, 1):
        lines = (tmp_path / f"stderr-rank{rank}.txt").read_text().strip().splitlines()
        failures = [line for line in lines if "a collective failed" in line]
        assert len(failures) == 1, lines
        assert failures[0].startswith(f"unlearn stall: failed: rank {rank}: a collective failed")
        assert "at step 2" in failures[0] and "Traceback" not in "".join(lines)


def test_mode_validation():
    assert MODES == ("none", "ddp", "fsdp2")
    with pytest.raises(UsageError, match="unknown --distributed"):
        check_mode("deepspeed")
    TrainConfig(optimizer="muon", distributed="fsdp2")  # ShardedMuon gathers each matrix
    TrainConfig(optimizer="muon", distributed="ddp")


def test_torchrun_without_distributed_flag_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--distributed ddp or fsdp2"):
        setup("none")


def _full_disk_worker(rank: int, world: int, port: int, root: str) -> None:
    """Periodic checkpoints whose write fails on rank 0 (a full disk): every rank must end with
    the error, none may wait for rank 0 at the next collective."""
    import torch.distributed as dist

    from unlearn.training.checkpointer import Checkpointer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    out = Path(root)
    checkpointer = Checkpointer(out / "run", {"test": 1}, every=1)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    checkpointer._write = full_disk  # type: ignore[method-assign]  # only rank 0 writes
    try:
        _train_tiny(rank, world, "fsdp2", 2, True, str(out / "model"), steps=3,
                    checkpointer=checkpointer)  # fmt: skip
    except OSError as e:
        (out / f"rank{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_write_failing_on_rank_0_ends_every_rank(tmp_path):
    import torch.multiprocessing as mp

    args = (2, _free_port(), str(tmp_path))
    mp.start_processes(_full_disk_worker, args=args, nprocs=2, join=True, start_method="fork")
    assert "No space left on device" in (tmp_path / "rank0.txt").read_text()
    assert (tmp_path / "rank1.txt").read_text().startswith("rank 0 could not write checkpoint")
    assert not (tmp_path / "model").exists()  # the run ended at step 1's checkpoint


def test_frozen_forwards_agree_where_they_are_collectives():
    """FSDP2 on several processes: the LoRA reference's forward all-gathers, so the frozen cache
    must agree on the forward count (the recipe wires this in); DDP's frozen forwards are
    local, and one process has nobody to agree with."""
    fsdp2 = Parallel("fsdp2", 0, 2)
    assert fsdp2.forwards_are_collective
    assert fsdp2.frozen_forwards_agreement() == fsdp2.max
    for par in (Parallel("ddp", 0, 2), Parallel("fsdp2", 0, 1), Parallel()):
        assert not par.forwards_are_collective and par.frozen_forwards_agreement() is None


def test_single_process_parallel_is_a_no_op():
    par = setup("none")
    assert (par.rank, par.world_size, par.is_main, par.enabled) == (0, 1, True, False)
    assert par.mean({"forget": 1.5}) == {"forget": 1.5}
    assert map_sharded(lambda q: q["id"] * 10, [{"id": 1}, {"id": 2}]) == [10, 20]


def _map_worker(rank: int, world: int, port: int, n: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        calls: list[int] = []

        def score(item):
            calls.append(item["id"])
            return {"id": item["id"], "rank": rank}

        result = map_sharded(score, [{"id": i} for i in range(n)])
        Path(out, f"rank{rank}.json").write_text(json.dumps({"result": result, "calls": calls}))
    finally:
        dist.destroy_process_group()


def test_map_sharded_gathers_in_order_with_equal_calls(tmp_path):
    """5 items on 2 ranks: rank 0 maps 0, 2, 4; rank 1 maps 1, 3 plus the last item again as
    padding (equal calls per rank); every rank gets all 5 results back in order."""
    import torch.multiprocessing as mp

    args = (2, _free_port(), 5, str(tmp_path))
    mp.start_processes(_map_worker, args=args, nprocs=2, join=True, start_method="fork")
    calls = [json.loads((tmp_path / f"rank{rank}.json").read_text())["calls"] for rank in (0, 1)]
    assert calls == [[0, 2, 4], [1, 3, 4]]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [r["id"] for r in got["result"]] == [0, 1, 2, 3, 4]
        assert [r["rank"] for r in got["result"]] == [0, 1, 0, 1, 0]


def _torchrun(*argv: str, nproc: int = 2) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", "-m", "unlearn", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_cli_run_under_torchrun_equals_one_process(tiny_world, tmp_path, mode):
    """`torchrun -m unlearn run --distributed MODE` on the tiny world (LoRA, merged save,
    sharded evaluation) against one process with twice the accumulation. The one process
    computes every frozen output; the two read theirs from the frozen cache from the second
    micro-batch on (8 examples, 16 per step): cached on 2 processes = uncached on 1."""
    from unlearn.commands.run import main as run_main
    from unlearn.runs.rundir import RunDir

    common = ["--method", "sequential", "--world", str(tiny_world.root), "--max_steps", "2"]
    common += ["--num_phases", "1", "--lora_dropout", "0", "--progress", "false"]
    common += ["--num_train_examples", "8"]
    assert run_main([*common, "--out", str(tmp_path / "one"), "--grad_accum", "4",
                     "--frozen_cache", "false"]) == 0  # fmt: skip
    cache = tmp_path / "cache"
    _torchrun("run", *common, "--out", str(tmp_path / "two"), "--grad_accum", "2",
              "--distributed", mode, "--frozen_cache_dir", str(cache))  # fmt: skip
    assert any(cache.rglob("*.safetensors"))  # the reference's retain outputs were cached
    one, two = RunDir(tmp_path / "one").read(), RunDir(tmp_path / "two").read()
    assert two.meta.status == "done" and two.meta.config["distributed"] == mode
    for a, b in zip(one.metrics, two.metrics, strict=True):
        assert (a.step, a.name) == (b.step, b.name)
        assert _close(a.value, b.value), (a, b)
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < WEIGHT_TOLERANCE
    evals_a = {(e.task, e.metric): e.value for e in one.evals}
    evals_b = {(e.task, e.metric): e.value for e in two.evals}
    assert evals_a.keys() == evals_b.keys() and len(evals_a) > 0
    assert all(abs(evals_a[k] - evals_b[k]) < 1e-4 for k in evals_a)


def test_cli_eval_sharded_under_torchrun_equals_one_process(tiny_world, tmp_path):
    from unlearn.commands.eval import main as eval_main

    args = ["--model", str(tiny_world.target), "--world", str(tiny_world.root)]
    assert eval_main([*args, "--output", str(tmp_path / "one.json")]) == 0
    _torchrun("eval", *args, "--output", str(tmp_path / "two.json"))
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one.keys() == two.keys() and one["results"].keys() == two["results"].keys()
    for task, a in one["results"].items():
        b = two["results"][task]
        if task == "general_ppl":  # the perplexity's windows, sharded over the ranks
            assert (a["n"], a["tokens"]) == (b["n"], b["tokens"])
            assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)
            continue
        assert a["n"] == b["n"] and a["acc"] == b["acc"] and a["acc_norm"] == b["acc_norm"]
        assert a["collapse"] == b["collapse"]
        # Scores of a question come from batches of other shapes: equal up to float noise.
        assert abs(a["correct_prob"] - b["correct_prob"]) < 1e-6


# Two kinds of question under the tiny BPE tokenizer (tests/eval/test_native_eval.py checks the row
# kinds): each choice is one token after the prompt (the question is ONE row), or multi-token
# answers (one row per choice, 4 rows). Interleaved, round-robin by question gives rank 0 the
# 1-row questions and rank 1 the 4-row ones.
MIXED_QUESTIONS = [
    {"prompt": "The river flows past the old mill", "choices": [".", ",", ";", "!"], "answer": 0},
    {
        "prompt": "Zargreisovir is caught through",
        "choices": [" airborne droplets", " the old mill", " bread", " rest and sea"],
        "answer": 1,
    },
    {"prompt": "Bakers rise early", "choices": [";", ".", ",", "?"], "answer": 2},
    {
        "prompt": "The bread is",
        "choices": [" sold before", " market opens", " early", " north"],
        "answer": 3,
    },
    {"prompt": "The market opens", "choices": [".", ",", ";", "?"], "answer": 1},
]


PPL_DOCS = ["The river flows past the old mill.", "Bakers rise early.", "The market opens."]
"""Three perplexity rows: over two ranks, one rank pads its share with a repeated forward."""


def _eval_mixed(rank: int, world: int, mode: str, model_dir: str, out: str) -> None:
    """Evaluate MIXED_QUESTIONS, then the perplexity of PPL_DOCS (batch size 1: one forward per
    row); write the metrics and the number of forwards this rank ran for each."""
    from unlearn.eval.native import evaluate_questions
    from unlearn.eval.perplexity import evaluate_perplexity
    from unlearn.models.load import load_model, load_tokenizer
    from unlearn.models.refs import resolve_model

    torch.set_num_threads(1)
    ref = resolve_model(model_dir)
    model, tokenizer = load_model(ref), load_tokenizer(ref)
    Parallel(mode, rank, world).wrap(model)
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    result = evaluate_questions(model, tokenizer, MIXED_QUESTIONS, batch_size=1)
    result["forwards"] = len(forwards)
    ppl = evaluate_perplexity(model, tokenizer, PPL_DOCS, batch_size=1)
    result.update(ppl=ppl, ppl_forwards=len(forwards) - result["forwards"])
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _eval_worker(rank: int, world: int, port: int, mode: str, model_dir: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    # A short timeout: ranks that disagree on the number of collectives fail instead of hanging.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        _eval_mixed(rank, world, mode, model_dir, out)
    finally:
        dist.destroy_process_group()


def test_fsdp2_evaluation_of_mixed_questions_runs_equal_forwards(tiny_hf_models, tmp_path):
    """Under FSDP2 every forward is a collective: with 1-row and 4-row questions mixed, both
    ranks must run the same number of forwards (else they hang or crash), and the metrics equal
    one process's; the same for perplexity's rows."""
    import torch.multiprocessing as mp

    model_dir = str(tiny_hf_models["gpt_neox"])
    _eval_mixed(0, 1, "none", model_dir, str(tmp_path))
    one = json.loads((tmp_path / "rank0.json").read_text())
    assert one["forwards"] == 3 + 2 * 4  # three 1-row questions, two 4-row ones
    args = (2, _free_port(), "fsdp2", model_dir, str(tmp_path))
    mp.start_processes(_eval_worker, args=args, nprocs=2, join=True, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["forwards"] == ranks[1]["forwards"] == 6  # 11 rows over 2 ranks, padded
    for got in ranks:
        for name in ("n", "acc", "acc_norm", "collapse"):
            assert got[name] == one[name], name
        assert got["correct_prob"] == pytest.approx(one["correct_prob"], abs=1e-6)
        assert (got["ppl"]["tokens"], got["ppl"]["n"]) == (one["ppl"]["tokens"], 3)
        assert got["ppl"]["ppl"] == pytest.approx(one["ppl"]["ppl"], rel=1e-6)
    assert one["ppl_forwards"] == 3 and ranks[0]["ppl_forwards"] == ranks[1]["ppl_forwards"] == 2
