"""Library chatter silenced: our progress bars say what is happening."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Silence the libraries' per-load chatter in this process.

    Called by the command line and by every worker process it spawns: a spawned process starts
    with fresh logger levels and warning filters, so each one must set them again. The levels
    are set before transformers is imported, since importing it imports torchao."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Offline, the hub client logs every retry before the final error we turn into one line.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    # transformers and peft import torchao (the quantisation attack's library) whenever it is
    # installed; torchao then warns about each optional CUDA kernel a CPU build cannot load, and
    # torch about each enum it registers: lines on every command, for kernels never called.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def start_worker(threads: int) -> None:
    """A local worker process's initializer (sweeps, searches, the demo): its share of the
    cores, then the chatter silenced. It lives in this light module because a spawned worker
    imports its initializer's module before running it: an initializer in a module that
    imports transformers would print torchao's warnings before it could silence them."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    quiet_libraries()
    import torch

    torch.set_num_threads(threads)
