"""The Python half of bench/gpu_check.sh: its inputs before the runs, its summary after them.

    python bench/gpu_check.py prepare --data DATA --out WORK   # WORK/model, WORK/*.jsonl
    python bench/gpu_check.py summary --work WORK              # the markdown summary

prepare: a randomly initialised 1B Llama (bench/throughput.py's LLAMA_1B blocks, or another of
its sizes with --size) with the vocabulary of the tokenizer in DATA/model, which
examples/make_local_real.py wrote, saved in float32 with that tokenizer; and forget, retain and
attack corpora of long documents (each joins make_local_real's short documents to more than 512
tokens, so every example fills --max_length 512 as on real corpora; the model is random, so
what the text says is irrelevant).

summary: per setting (1 GPU, FSDP2 on N GPUs) and method, from what the runs wrote: tokens/s
(the median of the training loop's `train/tokens_per_s` over the steps after the first, read
from the runs' TensorBoard events), MFU (6 x parameters x tokens/s over the GPUs' peak, the
device table of bench/throughput.py), peak GPU memory (sampled by nvidia-smi while the run
trained and saved: it includes the CUDA context and the allocator's cached blocks), the final
loss terms (run.json), `unlearn eval`'s accuracies and the attack's forget accuracy before and
after.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from throughput import SIZES, mfu, peak_tflops

CORPORA = ("forget", "retain", "attack")
LONG_DOCS = 64
"""Documents per corpus: more than 20 steps x 8 examples need not be unique (a warning says they
repeat), but the first steps should not repeat what the cache could serve."""
LONG_CHARS = 4000
"""Characters per long document: well over 512 tokens of the small BPE tokenizer."""


def prepare(data: Path, out: Path, size: str = "1b") -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(data / "model")
    small = json.loads((data / "model" / "config.json").read_text())
    ids = {k: small[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = LlamaConfig(**{**SIZES[size].config, "vocab_size": len(tokenizer), **ids})
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device:  # initialising 1B parameters on the GPU takes seconds, not a minute
        model = LlamaForCausalLM(config)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    params = sum(p.numel() for p in model.parameters())
    print(f"gpu_check: a random Llama of {params / 1e6:,.0f}M parameters in {out / 'model'}")
    rng = random.Random(0)
    for name in CORPORA:
        docs = [json.loads(line)["text"] for line in (data / f"{name}.jsonl").open()]
        long = []
        for _ in range(LONG_DOCS):
            parts: list[str] = []
            while sum(len(p) + 1 for p in parts) < LONG_CHARS:
                parts.append(rng.choice(docs))
            long.append({"text": " ".join(parts)})
        (out / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in long))


def tokens_per_s(run: Path) -> float | None:
    """The median logged throughput over the steps after the first (which warms up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    if "train/tokens_per_s" not in events.Tags().get("scalars", []):
        return None
    values = [e.value for e in events.Scalars("train/tokens_per_s") if e.step > 1]
    return statistics.median(values) if values else None


def peak_mib(samples: Path) -> float | None:
    """The largest GPU memory in use (MiB) among nvidia-smi's samples (all GPUs)."""
    if not samples.is_file():
        return None
    values = [float(v) for v in samples.read_text().split() if v.strip()]
    return max(values) if values else None


def attack_forget(attack: Path) -> str:
    """Forget accuracy before the attack -> after it (the first forget task)."""
    rows = [json.loads(line) for line in (attack / "evals.jsonl").open()]
    meta = json.loads((attack / "run.json").read_text())
    forget = meta["config"].get("forget_tasks") or []
    accs = [r for r in rows if r["metric"] == "acc" and r["status"] == "done"]
    if forget:
        accs = [r for r in accs if r["task"] == Path(forget[0]).stem]
    if not accs:
        return "-"
    first, last = min(accs, key=lambda r: r["step"]), max(accs, key=lambda r: r["step"])
    return f"{first['value']:.2f} -> {last['value']:.2f} ({last['step']} steps)"


def summary(work: Path) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work / "model"))
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    peak = peak_tflops(name)
    some_run = next((work / "runs").glob("*/*/run.json"))
    config = json.loads(some_run.read_text())["config"]
    lines = [
        f"GPU check on {name}: a random Llama of {params / 1e6:,.0f}M parameters, activation"
        " checkpointing, bf16 autocast over float32 weights, full fine-tuning, micro-batches of"
        f" {config['pdbs']} x {config['max_length']} tokens of forget and as many of retain per"
        " GPU. tokens/s: all GPUs together (median over the steps after the first); MFU: 6 x"
        f" parameters x tokens/s / (GPUs x {peak or 'unknown'} TFLOP/s dense bf16); peak"
        " memory: nvidia-smi's largest sample of one GPU while the run trained and saved (CUDA"
        " context and cached blocks included).",
        "",
        "| setting | method | status | tokens/s | MFU | peak GPU memory (MiB) | final loss terms"
        " | eval (acc) | attack: forget acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setting_dir in sorted((work / "runs").iterdir()):
        gpus = int(setting_dir.name.split("-")[-1]) if "fsdp2" in setting_dir.name else 1
        for run_json in sorted(setting_dir.glob("*/run.json")):
            run = run_json.parent
            if run.name.endswith("-attack"):
                continue
            meta = json.loads(run_json.read_text())
            tps = tokens_per_s(run)
            share = mfu(params, tps, peak, gpus) if tps is not None else None
            memory = peak_mib(setting_dir / f"{run.name}.mem")
            final = ", ".join(f"{k} {v:.4g}" for k, v in (meta.get("final") or {}).items())
            eval_path = setting_dir / f"{run.name}-eval.json"
            evals = "-"
            if eval_path.is_file():
                results = json.loads(eval_path.read_text())["results"]
                evals = ", ".join(
                    f"{Path(task).stem} {r['acc']:.2f}" for task, r in results.items() if "acc" in r
                )
            attack = setting_dir / f"{run.name}-attack"
            lines.append(
                f"| {setting_dir.name} | {run.name} | {meta['status']} "
                f"| {f'{tps:,.0f}' if tps is not None else '-'} "
                f"| {f'{100 * share:.1f}%' if share is not None else '-'} "
                f"| {f'{memory:,.0f}' if memory is not None else '-'} | {final or '-'} | {evals} "
                f"| {attack_forget(attack) if (attack / 'evals.jsonl').is_file() else '-'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="the random 1B model and the long corpora")
    p.add_argument("--data", type=Path, required=True, help="examples/make_local_real.py's out")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", choices=list(SIZES), default="1b",
                   help="the model's blocks (small: to rehearse the script on a CPU)")  # fmt: skip
    s = sub.add_parser("summary", help="the table of the runs in WORK/runs")
    s.add_argument("--work", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.data, args.out, args.size)
    else:
        print(summary(args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
