"""Phase 2's two runs side by side (unlearn.world.parallel): the same weights as one after the
other, and a failed, killed or interrupted twin process leaves no world and no process behind."""

from __future__ import annotations

import dataclasses
import inspect
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import unlearn.world.build as build_module
import unlearn.world.pretrain as pretrain_module
from unlearn.world import PRESETS, build_world
from unlearn.world.build import ThreadLayout
from unlearn.world.parallel import TwinProcess, TwinProcessError
from unlearn.world.phases import TwinJob, make_model, make_optimizer

SHORT = dataclasses.replace(
    PRESETS["tiny"], phase1_steps=2, phase2_steps=2, checkpoint_interval=2, warmup_steps=1
)


def _twin_children() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name == "filtered-twin-phase2"]


def test_thread_layout_splits_the_budget_when_side_by_side(monkeypatch):
    monkeypatch.setattr(build_module, "available_cores", lambda: 2)
    assert ThreadLayout.choose(1, None) == ThreadLayout(1, 1, parallel=True)
    assert ThreadLayout.choose(4, None) == ThreadLayout(4, 2, parallel=True)
    assert ThreadLayout.choose(2, False) == ThreadLayout(2, 2, parallel=False)
    monkeypatch.setattr(build_module, "available_cores", lambda: 1)
    assert ThreadLayout.choose(1, None) == ThreadLayout(1, 1, parallel=False)
    assert ThreadLayout.choose(2, None) == ThreadLayout(2, 1, parallel=True)  # --threads 2 asked


def test_parallel_and_sequential_builds_give_the_same_weights(tmp_path, monkeypatch):
    # Two short builds with the same thread counts, phase 2 side by side and one after the
    # other: every saved tensor must be equal (a short schedule keeps this cheap; any difference
    # in how the twin's process starts from phase 1's state would show after one step).
    monkeypatch.setitem(PRESETS, "tiny", SHORT)
    worlds = {
        parallel: build_world("tiny", 0, tmp_path / f"w{int(parallel)}", progress=False,
                              threads=1, parallel=parallel)
        for parallel in (True, False)
    }  # fmt: skip
    side, serial = worlds[True], worlds[False]
    assert side.stats["phase2_parallel"] and not serial.stats["phase2_parallel"]
    assert side.stats["threads"] == serial.stats["threads"] == {"phase1": 1, "phase2": 1}
    ours = [side.target, side.filtered, *side.checkpoints]
    theirs = [serial.target, serial.filtered, *serial.checkpoints]
    assert len(ours) == len(theirs) >= 3
    for a, b in zip(ours, theirs, strict=True):
        ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), a.name
    target = load_file(side.target / "model.safetensors")
    twin = load_file(side.filtered / "model.safetensors")
    assert any(not torch.equal(target[k], twin[k]) for k in target)  # phase 2 really differed
    assert serial.stats["baseline"] == side.stats["baseline"]
    assert {"phase2_target", "phase2_filtered", "phase2_wall"} <= set(side.stats["seconds"])


def test_a_killed_twin_process_fails_the_build_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny", SHORT)
    real = pretrain_module.train_phase

    def kill_twin_then_train(*args, **kwargs):
        if inspect.signature(real).bind(*args, **kwargs).arguments["start_step"] > 0:
            for child in _twin_children():  # as the out-of-memory killer would
                os.kill(child.pid, signal.SIGKILL)
                child.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "train_phase", kill_twin_then_train)
    with pytest.raises(TwinProcessError, match="filtered twin process was killed by SIGKILL"):
        build_world("tiny", 0, tmp_path / "w", progress=False, threads=1, parallel=True)
    assert list(tmp_path.iterdir()) == []  # no world, no half-built directory
    assert _twin_children() == []


def test_a_failing_twin_reports_its_error_and_leaving_early_stops_it(tmp_path: Path):
    model = make_model(SHORT, 300, 0, seed=0)
    optimizer = make_optimizer(model, SHORT)
    # No documents to pack: the child raises once it has loaded the phase-1 state.
    job = TwinJob(SHORT, [], eos_id=0, vocab_size=300, stream_seed=2, start_step=0)
    failed = pytest.raises(TwinProcessError, match="in its process: ValueError: no documents")
    with TwinProcess(job, model, optimizer, threads=1, workdir=tmp_path) as twin, failed:
        twin.result()
    assert list(tmp_path.iterdir()) == []
    # An error or Ctrl-C in the parent while the twin trains: the child is terminated and joined.
    with (
        pytest.raises(KeyboardInterrupt),
        TwinProcess(job, model, optimizer, threads=1, workdir=tmp_path) as twin,
    ):
        raise KeyboardInterrupt
    # Terminated while it starts (no handler yet) or while it loads or trains (SystemExit).
    assert twin.process.exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM)
    assert list(tmp_path.iterdir()) == [] and _twin_children() == []
