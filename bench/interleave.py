"""Timing several kinds of training step side by side in one process, and their peak memory.

Shared by bench/step_cost.py (a method's step against a plain step on the mini world) and
bench/throughput.py (every method against plain transformers + torch fine-tuning on a random
Llama).

Design choices:
- Interleaved, to be trusted on a noisy shared machine: after one warm-up call of every kind
  (allocator, kernels, lazy initialisation, a frozen cache filled), each round times every kind
  once, in an order that rotates from round to round, so a slow spell hits all kinds alike and
  no kind always runs first or last. A kind's cost is read against the baseline kind *of the
  same round* (a ratio per round) and summarised by the median over rounds with its spread.
- Peak memory is what a call added on top of what was held when it started (weights, frozen
  copies, caches): gradients, optimizer state, activations, frozen outputs. On CUDA that is
  `max_memory_allocated` minus `memory_allocated` at the start; on the CPU the resident
  high-water mark (VmHWM) minus the resident size at the start, the high-water mark reset before
  each call through /proc/self/clear_refs (Linux), so each kind gets its own number in one
  process. Before that reset, freed heap memory is handed back to the system (glibc's
  malloc_trim): the allocator otherwise keeps what an earlier call freed resident, the next call
  reuses it without raising the resident size, and its peak would read as ~0. Where the reset
  is refused, the process-wide peak (ru_maxrss) is used instead and
  `PeakMemory.per_call` is False: then every kind's number includes every earlier call's peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timed:
    """One timing call of one kind."""

    seconds: float
    """Seconds per optimizer step."""
    peak_bytes: int
    """Peak memory above what was held when the call started."""


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _trim_heap() -> None:
    """Return freed heap memory to the system (glibc); elsewhere nothing to do. The earlier
    call's objects are collected first: an optimizer or a graph kept alive by a cycle would
    otherwise still hold its memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of a stretch of work on `device`: `start()`, the work, then `stop()`."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.per_call = True
        """Whether each stretch gets its own peak (False: the CPU high-water mark could not be
        reset here, so a stretch's peak includes every earlier one's)."""
        self._before = 0

    def _reset_cpu_peak(self) -> None:
        if not self.per_call:
            return
        _trim_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5": reset the peak resident size to the current one
        except OSError:
            self.per_call = False

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
            return
        self._reset_cpu_peak()
        try:
            self._before = _status_bytes("VmRSS")
        except OSError:
            self.per_call, self._before = False, 0

    def stop(self) -> int:
        """Bytes of the peak above what was held at `start`."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self._before
        if self.per_call:
            return max(0, _status_bytes("VmHWM") - self._before)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._before


def interleaved(
    kinds: Sequence[str], run: Callable[[str], Timed], rounds: int, warmup: bool = True
) -> dict[str, list[Timed]]:
    """Each kind's timings over `rounds` interleaved rounds, after one untimed warm-up call of
    every kind (which also fills a frozen cache that a "cached" kind reads; `warmup=False`: the
    caller warmed up already)."""
    if warmup:
        for kind in kinds:
            run(kind)
    out: dict[str, list[Timed]] = {k: [] for k in kinds}
    n = len(kinds)
    for r in range(rounds):
        for kind in [*kinds[r % n :], *kinds[: r % n]]:
            out[kind].append(run(kind))
    return out


def ratio(times: dict[str, list[float]], kind: str, base: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of kind's step time / base's step time that round."""
    ratios = [t / b for t, b in zip(times[kind], times[base], strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def ratio_cell(times: dict[str, list[float]], kind: str, base: str) -> str:
    """`median [min-max]` of `ratio`, for a markdown table."""
    med, lo, hi = ratio(times, kind, base)
    return f"{med:.2f} [{lo:.2f}-{hi:.2f}]"
