"""Loading models and tokenizers, by local directory or hub id + revision.

The mini world's models are ordinary HF model directories, so the same code path serves a 1M-
parameter world model and a 6.9B hub checkpoint (`--model EleutherAI/deep-ignorance-unfiltered
--revision global_step38144`). `resolve_model` validates a reference cheaply (config only) so a
bad `--model` fails with one line before any weights load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from unlearn.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelRef:
    """A validated model reference: a local dir or a hub id (+ revision)."""

    name: str
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.name).exists()

    def __str__(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model(
    name: str | os.PathLike, revision: str | None = None, trust_remote_code: bool = False
) -> ModelRef:
    """Check that `name` is a causal LM (local dir with a config, or a reachable hub id).

    Reads only the config, so it is cheap and runs before any weights load.
    """
    from transformers import AutoConfig

    name = str(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UsageError(f"{name} is not a model directory (no config.json)")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise UsageError(f"{name} is not a model directory (no weight files)")
        name = str(path.absolute())
    elif not _looks_like_hub_id(name):
        raise UsageError(f"model {name} not found (neither a local directory nor a hub id)")
    try:
        AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"cannot load model config for {name}"
            f"{'@' + revision if revision else ''}: {first} "
            "(offline? download it on a connected machine or pass a local directory)"
        ) from None
    except ValueError as e:
        raise UsageError(f"{name} is not a usable model: {str(e).splitlines()[0]}") from None
    return ModelRef(name, revision)


def load_tokenizer(ref: ModelRef, tokenizer: str | None = None):
    """The model's tokenizer (or an explicit one), with a pad token for batching."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer or ref.name, revision=ref.revision)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    ref: ModelRef,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a causal LM in `dtype` on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    model = AutoModelForCausalLM.from_pretrained(
        ref.name, revision=ref.revision, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
