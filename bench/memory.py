"""Peak memory of one training step with and without activation checkpointing, and the loss of
bf16 autocast against float32, on a randomly initialised ~100M-parameter Llama at 512 tokens.

    .venv/bin/python bench/memory.py --out docs/results/training-memory.md

Each setting runs in a fresh process (peak memory is a per-process high-water mark): the tool's
own training loop (`training.loop.train`, the language-modelling objective, AdamW, full
fine-tuning) for `--steps` optimizer steps on random tokens, the model built from a config and
seeded alike in every process. On the CPU the number is the process's peak resident memory
(ru_maxrss) minus its resident memory before the first step (model and data loaded), i.e. what
the steps added: gradients, optimizer state, activations; on CUDA it is
`torch.cuda.max_memory_allocated` over the steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "float32": {"mixed_precision": "no", "checkpointing": False},
    "float32 + checkpointing": {"mixed_precision": "no", "checkpointing": True},
    "bf16 autocast": {"mixed_precision": "bf16", "checkpointing": False},
    "bf16 autocast + checkpointing": {"mixed_precision": "bf16", "checkpointing": True},
}
LLAMA = dict(
    vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
    tie_word_embeddings=False,
)  # fmt: skip


def _rss_bytes() -> int:
    """This process's current resident memory (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(setting: str, steps: int, tokens: int, batch: int) -> dict:
    """Measure one setting in this process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from unlearn.config.settings import TrainConfig
    from unlearn.data.batching import ExampleStream
    from unlearn.models.gradient_checkpointing import enable_gradient_checkpointing
    from unlearn.objectives import get_objective
    from unlearn.training.loop import make_plan, train

    opts = SETTINGS[setting]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).requires_grad_(True)
    if opts["checkpointing"]:
        enable_gradient_checkpointing(model)
    g = torch.Generator().manual_seed(1)
    examples = [torch.randint(1, LLAMA["vocab_size"], (tokens,), generator=g).tolist()
                for _ in range(batch * steps)]  # fmt: skip
    stream = ExampleStream(examples, batch, 0, seed=0)
    cfg = TrainConfig(lr=1e-4, pdbs=batch, grad_accum=1, max_steps=steps, max_length=tokens,
                      mixed_precision=opts["mixed_precision"])  # fmt: skip
    objective = get_objective("language_modeling")()
    plan = make_plan(cfg, len(examples), objective.phases, 1)
    losses: list[float] = []
    before = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(model, objective, None, stream, None, cfg, plan, device=device, progress=False,
          on_log=lambda step, v: losses.append(v["lm"]))  # fmt: skip
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    # What `unlearn run --dry-run` predicts for the same steps (one micro-batch, no reference):
    # what the steps add to a loaded model is gradients, optimizer state and activations.
    from unlearn.config.settings import LoraSettings
    from unlearn.training.memory_plan import plan_memory

    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(**LLAMA))
    cfg.gradient_checkpointing = opts["checkpointing"]
    mem = plan_memory(meta, cfg, LoraSettings(lora=False), 1, micro_batches=1)
    act = mem.activations_checkpointed if opts["checkpointing"] else mem.activations
    return {
        "estimate_bytes": mem.gradients + mem.optimizer + act,
        "setting": setting,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_bytes": peak,
        "seconds_per_step": seconds / steps,
        "losses": losses,
        "device": device.type,
    }


def table(results: list[dict], command: str) -> str:
    base = next(r for r in results if r["setting"] == "float32")
    lines = [
        "# Training memory: activation checkpointing and mixed precision",
        "",
        f"Produced by `{command}` (bench/memory.py). A randomly initialised Llama of "
        f"{base['params'] / 1e6:.0f}M parameters, full fine-tuning with AdamW, micro-batches of "
        f"{ARGS.batch} x {ARGS.tokens} tokens, {ARGS.steps} optimizer steps per setting, each "
        f"setting in a fresh process on {base['device']}. Peak memory: "
        + (
            "`torch.cuda.max_memory_allocated`."
            if base["device"] == "cuda"
            else "the process's peak resident memory minus its resident memory before the "
            "first step (what the steps added: gradients, AdamW state, activations)."
        ),
        "",
        "| setting | peak memory of the steps | vs float32 | dry-run estimate "
        "| estimate / measured | s / step | loss at the last step "
        "| largest loss difference to float32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        diff = max(abs(a - b) / b for a, b in zip(r["losses"], base["losses"], strict=True))
        lines.append(
            f"| {r['setting']} | {r['peak_bytes'] / 2**20:,.0f} MiB "
            f"| {r['peak_bytes'] / base['peak_bytes']:.2f}x "
            f"| {r['estimate_bytes'] / 2**20:,.0f} MiB "
            f"| {r['estimate_bytes'] / r['peak_bytes']:.2f} "
            f"| {r['seconds_per_step']:.1f} "
            f"| {r['losses'][-1]:.4f} | {100 * diff:.3f}% |"
        )
    if base["device"] == "cpu":
        lines += [
            "",
            "s / step is wall time on the machine that ran it (possibly shared with other jobs). A"
            " CPU without native bf16 arithmetic emulates it, so bf16 steps are far slower there"
            " than in float32, unlike on a GPU; the memory and loss columns do not depend on it.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown table here (default: print it)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one setting
    global ARGS
    ARGS = parser.parse_args()
    if ARGS.one:
        print(json.dumps(one(ARGS.one, ARGS.steps, ARGS.tokens, ARGS.batch)))
        return 0
    results = []
    for setting in SETTINGS:
        argv = [sys.executable, __file__, "--one", setting, "--steps", str(ARGS.steps),
                "--tokens", str(ARGS.tokens), "--batch", str(ARGS.batch)]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"memory: {setting} failed:\n{done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{setting}: {results[-1]['peak_bytes'] / 2**20:,.0f} MiB", file=sys.stderr)
    command = "python bench/memory.py" + (f" --out {ARGS.out}" if ARGS.out else "")
    text = table(results, command)
    if ARGS.out:
        Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ARGS.out).write_text(text)
    else:
        print(text)
    return 0


ARGS: argparse.Namespace


if __name__ == "__main__":
    sys.exit(main())
