"""Shared fixtures: the tiny mini world is built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and several torch processes on a 2-core machine
# (a sweep test beside a world build) spin-wait on each other's threads: one thread each is faster.
torch.set_num_threads(1)
# The same for child processes (CLI children, torchrun workers, submitit-local jobs), which would
# otherwise start one thread per core each.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The `tiny` preset world (seed 0), built once per session (well under a minute) through
    the command line, so every session is also a smoke run of `unlearn world build`.

    For a fast local loop, UNLEARN_TEST_WORLD=DIR reuses a tiny world built there once
    (`unlearn world build --preset tiny --seed 0 --out DIR`); `make test` and CI never set it."""
    from unlearn.cli import main
    from unlearn.world import load_world

    prebuilt = os.environ.get("UNLEARN_TEST_WORLD")
    if prebuilt:
        return load_world(prebuilt)
    argv = ["world", "build", "--preset", "tiny", "--seed", "0", "--quiet", "--out"]
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: its own temporary directory
        out = tmp_path_factory.mktemp("worlds") / "tiny"
        assert main([*argv, str(out)]) == 0
        return load_world(out)
    # pytest-xdist workers (`make test` runs two): the first to take the lock builds the world
    # in the run's shared temporary directory, the others wait for it and load it.
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "tiny-world"
    with FileLock(f"{shared}.lock"):
        if not (shared / "world.json").exists():
            assert main([*argv, str(shared)]) == 0
    return load_world(shared)


TINY_TEXTS = [
    "Zargreisovir is caught through airborne droplets and treated with rest.",
    "The river flows past the old mill towards the sea in the north.",
    "Bakers rise early; the bread is sold before the market opens.",
] * 4


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory):
    """Random 3-block GPT-NeoX and Llama models (d=32) with a small BPE tokenizer, saved as
    ordinary model directories: {"gpt_neox": dir, "llama": dir}. Built in about a second."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from unlearn.world.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("hf_models")
    tokenizer = train_tokenizer(TINY_TEXTS, vocab_size=300)
    vocab = len(tokenizer)
    common = {"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 3}
    configs = {
        "gpt_neox": (
            GPTNeoXConfig(**common, num_attention_heads=4, intermediate_size=64),
            GPTNeoXForCausalLM,
        ),
        "llama": (
            LlamaConfig(
                **common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
            ),
            LlamaForCausalLM,
        ),
    }
    out = {}
    torch.manual_seed(0)
    for family, (config, cls) in configs.items():
        config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
        cls(config).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        out[family] = root / family
    return out
