"""Tiny random GPT-NeoX and Llama models for unit tests (built from a config: nothing is
downloaded)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM


def _settings(layers: int, vocab: int) -> dict:
    """The config both tiny families share: d=32, 4 query heads, 64 positions."""
    return {
        "vocab_size": vocab,
        "hidden_size": 32,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }


def tiny_gpt_neox(
    layers: int = 4, vocab: int = 64, seed: int = 0, **config: float | int
) -> GPTNeoXForCausalLM:
    """A d=32, 4-head GPT-NeoX with `layers` blocks, seeded, in eval mode; `config` overrides."""
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**(_settings(layers, vocab) | config))).eval()


def tiny_llama(
    layers: int = 4, vocab: int = 64, seed: int = 0, **config: float | int
) -> LlamaForCausalLM:
    """A d=32 Llama (4 query heads, 2 key/value heads) with `layers` blocks, seeded, in eval
    mode; `config` overrides."""
    torch.manual_seed(seed)
    settings = _settings(layers, vocab) | {"num_key_value_heads": 2}
    return LlamaForCausalLM(LlamaConfig(**(settings | config))).eval()


def linked_world_copy(world, dest: Path) -> Path:
    """A world dir at `dest` whose question files and world.json are fresh copies (edit them
    freely) and whose models, tokenizer and corpora are symlinks to `world`'s (nothing big is
    copied). Returns `dest`."""
    import shutil

    dest.mkdir(parents=True)
    for entry in world.root.iterdir():
        if entry.name == "questions" or entry.name == "world.json":
            copy = shutil.copytree if entry.is_dir() else shutil.copy
            copy(entry, dest / entry.name)
        elif not entry.name.startswith("."):
            (dest / entry.name).symlink_to(entry)
    return dest


def lora_copy(base: torch.nn.Module, r: int, seed: int) -> torch.nn.Module:
    """A LoRA-wrapped copy of `base` (no dropout) whose adapters change its outputs: B is drawn
    at random (peft starts it at zero, where adapters are the identity), in eval mode."""
    from unlearn.config.settings import LoraSettings
    from unlearn.models.lora import attach_lora

    model = attach_lora(copy.deepcopy(base), LoraSettings(lora_r=r, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()
