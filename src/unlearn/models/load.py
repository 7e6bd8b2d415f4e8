"""Loading a resolved model and its tokenizer onto the default device."""

from __future__ import annotations

import torch

from unlearn.errors import UsageError
from unlearn.models.refs import ModelRef

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(ref: ModelRef, tokenizer: str | None = None):
    """The model's tokenizer (or an explicit one), with a pad token for batching."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        tokenizer or ref.name,
        revision=None if tokenizer else ref.revision,
        trust_remote_code=ref.trust_remote_code,
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    ref: ModelRef, dtype: str = "float32", device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load a causal LM in `dtype` on `device`, in eval mode (remote code as `ref` allows)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    model = AutoModelForCausalLM.from_pretrained(
        ref.name,
        revision=ref.revision,
        dtype=DTYPES[dtype],
        trust_remote_code=ref.trust_remote_code,
    )
    return model.to(device).eval()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
