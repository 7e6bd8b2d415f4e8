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
        **no_hub_kernels(),
    )
    return model.to(device).eval()


def no_hub_kernels() -> dict[str, bool]:
    """`from_pretrained` keywords that keep transformers' own PyTorch layers.

    Since transformers 5 a model loads with hub kernels on whenever the `kernels` package is
    installed: layers are swapped for kernels fetched from the Hub (a network call on a GPU node,
    and numbers that depend on what the Hub serves that day), and every `train()` / `eval()`
    re-runs the kernel selection, which cost about 6% of an unlearning run's time on the mini
    world, where the reference model flips modes twice per step. Transformers 4 never turned
    them on, and its `from_pretrained` does not know the keyword.
    """
    import transformers

    return {"use_kernels": False} if int(transformers.__version__.split(".")[0]) >= 5 else {}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
