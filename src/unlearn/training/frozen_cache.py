"""Frozen outputs computed once per campaign: a per-example cache, in memory and on disk.

The source checkpoint's and the reference model's outputs on a fixed example never change during
a run (DESIGN.md §4), and every epoch, sweep point and trial that trains on the same examples
reads the same ones. This module keeps them per *example* (batches are reshuffled every epoch, so
a per-batch cache would never hit again) and pads them back into the micro-batch layout.

Design choices:
- An entry is keyed by *what* was computed and *on which example*. `what` is a JSON-able dict the
  caller builds: the frozen model's identity (`models.ModelRef.cache_key`: name, revision, local
  weight files' sizes and times), dtype, device type, the output kind and its layers, and for
  transferred targets the affine maps' content digest. The example is the digest of its token ids
  (not its index: two sweep points that sample different documents share what they have in common).
- Layout on disk: `DIR/<digest of what>/<digest of the tokens>.safetensors`, one file per example
  holding one tensor per name, each `[tokens, ...]` (no padding), with the full `what` JSON, the
  example digest, its length and a checksum of its tensors in the file's metadata. A file whose
  metadata, names or lengths do not match, whose tensors do not match the checksum (a payload
  corrupted behind an intact header, which safetensors reads without complaint), or that cannot
  be read (truncated, corrupt), is never used: the batch is recomputed and the file rewritten.
  Writes are atomic (temporary file + rename), so a reader in another process never sees half a
  file; files get the usual permissions (0666 minus the umask), not save_file's 0600.
- Memory: a process-wide LRU over entries, bounded in bytes (`--frozen_cache_memory_gb`), shared
  by every run in the process (in-process sweeps). Entries live on the CPU; a hit is copied to
  the training device (much cheaper than the frozen forward it replaces).
- Disk cap (`--frozen_cache_gb`): when the directory grows past it, the oldest-written files are
  deleted down to 90% of it. The size is counted once per process and then tracked, so with
  several processes writing at once the cap is approximate.
- Entries are computed one example at a time (a forward on that example alone, unpadded), never
  taken from a micro-batch's forward: a batched forward's rounding depends on the row's
  neighbours and padding, so entries written by whichever run or sweep worker got there first
  would make results depend on the order things ran in. Alone, an example gives the same
  numbers whoever computes it (the key holds model, dtype, device type and CPU thread count), so
  cached runs are deterministic. The cost: one small forward per example on its first use, once
  per campaign.
- Data parallelism: each rank looks up its own rows, so ranks miss different examples. Where a
  frozen forward is a collective (FSDP2, whose LoRA reference is the sharded model itself), the
  ranks agree on the largest miss count of the micro-batch (one all-reduce) and a rank that
  missed fewer runs the difference as padding forwards, so no rank ever skips an all-gather the
  others run (the same rule as the sharded evaluator's `distributed.map_sharded`).
- Large vocabularies: logits are cached only when one example's logits fit in
  `LOGITS_MAX_BYTES_PER_EXAMPLE`; above it, KL retain recomputes the reference logits each time
  (a top-k approximation would change the loss; see docs/methods.md).
- The cached values are those the uncached code computes, up to float rounding (the forward in
  eval mode, no dropout, the example alone instead of in its micro-batch); padded positions,
  which every loss masks out, are zeros. Rounding matters once: at a run's first step
  (StepContext.first_step) a live retain term is exactly 0 with zero gradient and a cached one
  is not, and Adam turns that gradient into whole steps, so the first step computes live and
  does not touch the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unlearn.errors import UsageError
from unlearn.fsutil import default_permissions

LOGITS_MAX_BYTES_PER_EXAMPLE = 4 * 2**20
"""Reference logits are cached only when one example's logits take at most this many bytes
(e.g. 256 tokens x 4096 vocabulary in float32); larger vocabularies recompute them."""

SUFFIX = ".safetensors"


@dataclass
class FrozenCacheArgs:
    """The frozen-output cache (source activations, reference outputs; docs/methods.md)."""

    frozen_cache: bool = True
    """Cache frozen-model outputs per example, in memory and on disk, and reuse them across
    epochs, runs and processes (false: compute them every micro-batch)."""
    frozen_cache_dir: str | None = None
    """Its directory; default: WORLD/frozen-cache with --world, else frozen-cache next to OUT."""
    frozen_cache_gb: float = 4.0
    """Disk cap in GB: past it, the oldest files are deleted (0: memory only)."""
    frozen_cache_memory_gb: float = 2.0
    """In-process cap in GB (least recently used entries are dropped)."""

    def __post_init__(self) -> None:
        for name in ("frozen_cache_gb", "frozen_cache_memory_gb"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise UsageError(f"--{name} must be a finite number >= 0, got {value}")


def digest(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()[:32]


def example_digest(token_ids: Sequence[int]) -> str:
    """The identity of an example: a digest of its token ids."""
    return digest(torch.as_tensor(list(token_ids), dtype=torch.int64).numpy().tobytes())


Entry = dict[str, torch.Tensor]


def entry_checksum(entry: Entry) -> str:
    """A digest of an entry's tensors (names, dtypes, shapes and bytes), stored in its file's
    metadata and recomputed on every read from disk (about 1 GB/s: small beside the forward a
    hit saves)."""
    h = hashlib.sha256()
    for name in sorted(entry):
        t = entry[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class _Memory:
    """Process-wide LRU of entries, bounded in bytes."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple[str, str], tuple[Entry, int]] = OrderedDict()
        self.bytes = 0
        self.cap = 0
        self.lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> Entry | None:
        with self.lock:
            hit = self.entries.get(key)
            if hit is None:
                return None
            self.entries.move_to_end(key)
            return hit[0]

    def put(self, key: tuple[str, str], entry: Entry) -> None:
        size = sum(t.numel() * t.element_size() for t in entry.values())
        with self.lock:
            if size > self.cap:
                return
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self.entries[key] = (entry, size)
            self.bytes += size
            while self.bytes > self.cap:
                _, (_, dropped) = self.entries.popitem(last=False)
                self.bytes -= dropped

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.bytes = 0


MEMORY = _Memory()
_DISK_BYTES: dict[Path, int] = {}
"""Bytes under each cache directory, counted once per process, then tracked by our writes."""


class FrozenCache:
    """Per-example frozen outputs: `rows` returns them in a micro-batch's layout."""

    def __init__(
        self, directory: str | os.PathLike | None, disk_gb: float = 4.0, memory_gb: float = 2.0
    ) -> None:
        self.disk_cap = int(disk_gb * 1e9)
        MEMORY.cap = int(memory_gb * 1e9)
        self.dir: Path | None = None
        self.hits = 0
        self.misses = 0
        self.agree: Callable[[int], int] | None = None
        """Under data parallelism where a frozen forward runs collectives (FSDP2: the LoRA
        reference is the sharded model), the largest of the ranks' miss counts for a
        micro-batch (`distributed.Parallel.max`); every rank then runs that many frozen
        forwards. None: forwards are local, each rank computes only its own misses."""
        if directory is not None and self.disk_cap > 0:
            self.dir = self._writable(Path(directory))

    @staticmethod
    def _writable(directory: Path) -> Path | None:
        probe = directory / f".probe.{os.getpid()}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            print(
                f"warning: frozen cache dir {directory} is not writable ({e.strerror}):"
                " caching in memory only",
                file=sys.stderr,
            )
            return None
        return directory

    def rows(
        self,
        what: dict,
        names: Sequence[str],
        examples: Sequence[str],
        lengths: Sequence[int],
        compute_one: Callable[[int], Entry],
        device: torch.device | str,
    ) -> Entry:
        """The frozen outputs `names` of a micro-batch whose row i is example `examples[i]` with
        `lengths[i]` valid tokens (right-padded), as `[batch, seq, ...]` tensors: each row from
        its cache entry, or `compute_one(i)` (that example alone, `[1, length, ...]`), stored.

        Entries are computed one example at a time, never in a micro-batch: a batched forward's
        rounding depends on the row's neighbours and padding, so entries written by whichever
        run or sweep worker came first would make results depend on the order they ran in. One
        example alone gives the same numbers whoever computes it (same key: model, dtype,
        device, threads), so a cached run is deterministic."""
        key = json.dumps(what, sort_keys=True)
        space = digest(key)
        found = [
            self._get(space, key, ex, names, n) for ex, n in zip(examples, lengths, strict=True)
        ]
        missing = [i for i, entry in enumerate(found) if entry is None]
        self.hits += len(found) - len(missing)
        self.misses += len(missing)
        # Ranks miss different examples (each has seen its own share of the data), and under
        # FSDP2 a frozen forward is a collective: agree first, then every rank runs as many as
        # the rank that missed most, the extra ones on this micro-batch's first example.
        forwards = self.agree(len(missing)) if self.agree is not None else len(missing)
        for i in missing:
            out = compute_one(i)
            n = lengths[i]
            entry = {name: out[name][0, :n].detach().to("cpu", copy=True) for name in names}
            self._put(space, key, examples[i], entry)
            found[i] = entry
        for _ in range(forwards - len(missing)):
            compute_one(0)  # padding: the same collectives as the other ranks, result dropped
        return _assemble(found, names, lengths, device)  # type: ignore[arg-type]

    def _path(self, space: str, example: str) -> Path:
        assert self.dir is not None
        return self.dir / space / f"{example}{SUFFIX}"

    def _get(
        self, space: str, key: str, example: str, names: Sequence[str], length: int
    ) -> Entry | None:
        entry = MEMORY.get((space, example))
        if entry is None and self.dir is not None:
            entry = self._read(self._path(space, example), key, example)
            if entry is not None:
                MEMORY.put((space, example), entry)
        if entry is None or set(entry) != set(names):
            return None
        if any(t.dim() < 1 or t.shape[0] != length for t in entry.values()):
            return None
        return entry

    @staticmethod
    def _read(path: Path, key: str, example: str) -> Entry | None:
        """A file's entry if it is whole, says it holds `key` on `example` and its tensors match
        its checksum; None otherwise (missing, truncated, corrupted, another key, written
        without a checksum: then it is recomputed and rewritten)."""
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key or meta.get("example") != example:
                    return None
                length = int(meta.get("length", -1))
                entry = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            if meta.get("checksum") != entry_checksum(entry):
                return None
        except Exception:  # any unreadable file is a miss, never a crash
            return None
        if any(t.dim() < 1 or t.shape[0] != length for t in entry.values()):
            return None
        return entry

    def _put(self, space: str, key: str, example: str, entry: Entry) -> None:
        MEMORY.put((space, example), entry)
        if self.dir is None:
            return
        path = self._path(space, example)
        length = next(iter(entry.values())).shape[0]
        meta = {"key": key, "example": example, "length": str(length),
                "checksum": entry_checksum(entry)}  # fmt: skip
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in entry.items()}, str(tmp), metadata=meta)
            default_permissions(tmp)
            size = tmp.stat().st_size
            os.replace(tmp, path)
        except OSError as e:
            print(
                f"warning: writing the frozen cache failed ({e}): caching in memory only",
                file=sys.stderr,
            )
            tmp.unlink(missing_ok=True)
            self.dir = None
            return
        self._account(size)

    def _account(self, added: int) -> None:
        assert self.dir is not None
        if self.dir not in _DISK_BYTES:
            _DISK_BYTES[self.dir] = sum(size for _, size, _ in _files(self.dir))
        else:
            _DISK_BYTES[self.dir] += added
        if _DISK_BYTES[self.dir] > self.disk_cap:
            _DISK_BYTES[self.dir] = _evict(self.dir, int(0.9 * self.disk_cap))


def _files(directory: Path) -> list[tuple[float, int, Path]]:
    out = []
    for path in directory.glob(f"*/*{SUFFIX}"):
        try:
            st = path.stat()
        except OSError:  # deleted by another process meanwhile
            continue
        out.append((st.st_mtime, st.st_size, path))
    return out


def _evict(directory: Path, target: int) -> int:
    """Delete the oldest files until at most `target` bytes remain; returns the bytes left."""
    files = sorted(_files(directory))
    total = sum(size for _, size, _ in files)
    for _, size, path in files:
        if total <= target:
            break
        path.unlink(missing_ok=True)
        total -= size
    return total


def _assemble(
    entries: Sequence[Entry], names: Sequence[str], lengths: Sequence[int], device
) -> Entry:
    """Per-example entries padded (with zeros) into `[batch, max length, ...]` tensors."""
    width = max(lengths)
    out: Entry = {}
    for name in names:
        first = entries[0][name]
        padded = torch.zeros((len(entries), width, *first.shape[1:]), dtype=first.dtype)
        for i, (e, n) in enumerate(zip(entries, lengths, strict=True)):
            padded[i, :n] = e[name]
        out[name] = padded.to(device)
    return out


def default_dir(world_root: str | os.PathLike | None, out: str | os.PathLike) -> Path:
    """WORLD/frozen-cache when the run has a world, else frozen-cache beside the run directory
    (runs of one campaign usually share a parent)."""
    if world_root is not None:
        return Path(world_root) / "frozen-cache"
    return Path(out).resolve().parent / "frozen-cache"


def from_args(
    args: FrozenCacheArgs, world_root: str | os.PathLike | None, out: str | os.PathLike
) -> FrozenCache | None:
    if not args.frozen_cache:
        return None
    directory = args.frozen_cache_dir or default_dir(world_root, out)
    return FrozenCache(directory, args.frozen_cache_gb, args.frozen_cache_memory_gb)


def frozen_key(model, dtype: str, device: torch.device | str, mixed_precision: str = "no") -> dict:
    """The identity of a frozen model's weights as computed: `model` is a `models.ModelRef`
    (its cache_key: name, revision, local weight files), plus the dtype, the compute dtype under
    mixed precision, the device type and on the CPU the thread count (kernels, and CPU
    reductions split over threads, differ by float rounding: entries are shared only where they
    are the numbers this process would compute)."""
    kind = torch.device(device).type
    key = {"model": model.cache_key(), "dtype": dtype, "device": kind}
    if mixed_precision != "no":  # absent otherwise: keys of runs without it stay as they were
        key["mixed_precision"] = mixed_precision
    if kind == "cpu":
        key["threads"] = torch.get_num_threads()
    return key
