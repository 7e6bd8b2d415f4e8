"""Shared fixtures: the tiny mini world is built once per test session."""

from __future__ import annotations

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and several torch processes on a 2-core machine
# (a sweep test beside a world build) spin-wait on each other's threads: one thread each is faster.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The `tiny` preset world (seed 0), built once per session (well under a minute)."""
    from unlearn.world import build_world

    return build_world("tiny", 0, tmp_path_factory.mktemp("worlds") / "tiny", progress=False)
