"""Throughput of every method's step beside a plain fine-tuning step, measured side by side.

    .venv/bin/python bench/throughput.py                          # ~100M Llama, 512 tokens
    .venv/bin/python bench/throughput.py --small --steps 1 --rounds 1   # a tiny model, seconds
    .venv/bin/python bench/throughput.py --model 1b --methods rmu,npo,sequential \\
        --gradient_checkpointing --mixed_precision bf16 --out throughput.md

One process builds a randomly initialised Llama (`--model`: bench/memory.py's ~100M config by
default, a tiny one with --small, a 1B one, or the config of a model directory) and times, on
the same random-token forget and retain micro-batches, interleaved (bench/interleave.py, shared
with bench/step_cost.py):

- plain: a fine-tuning step written with transformers + torch only, no unlearn code: the
  model's own loss (`labels=`) on the forget and on the retain micro-batch, one backward of
  their sum, gradient clipping, `torch.optim.AdamW` with the settings unlearn's AdamW uses;
- each method's step through unlearn's training loop, its frozen outputs (reference outputs,
  source activations) computed every micro-batch;
- the same with a warm frozen cache (unlearn.training.frozen_cache), as in every epoch after
  the first and every sweep point after the first on the same examples; a method with nothing
  cacheable at this size (KL retain logits over the cache's per-example limit) has no such row.

The methods run in their documented mode (`--mode`: LoRA for lens, full fine-tuning for the
others), each against plain fine-tuning of the same mode (plain LoRA training of the same
peft-wrapped model). Reported per kind: tokens/s (a step's forget + retain tokens over its time,
median over rounds), the ratio to plain fine-tuning (per round, median [min-max]), the peak
memory the steps added above what was held before them (bench/interleave.PeakMemory), and on
CUDA the model FLOPs utilisation, 6 x parameters x tokens/s / the device's peak dense bf16
FLOP/s (every parameter of the base model, embeddings included; attention's quadratic term left
out; the same formula for every kind, so a method's extra forwards lower its MFU).
Targets: every method's uncached step <= 1.3x plain fine-tuning, cached <= 1.05x.

Design choices:
- One model per mode is shared by every kind and restored to its initial weights before each
  timed call (untimed), so every call trains the same weights on the same micro-batches and no
  unlearning objective (grad_diff's ascent, say) drifts the model into the divergence guard.
- Each call builds its optimizer, runs one untimed step (the optimizer's lazy state, a first
  step's allocations), then `--steps` timed steps; the peak memory covers the whole call, so it
  includes the optimizer state.
- A random model has no tuned lens and no source checkpoint: lens gets an identity tuned lens
  (TunedLens.for_model) and checkpoint_transfer a random source model of the same shape with
  random affine maps. Their shapes, hence their cost, are those of fitted ones; their losses
  mean nothing (nor do any method's here).
- Sequential is timed in its first phase (its deepest layer), as in bench/step_cost.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import io
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from interleave import PeakMemory, Timed, interleaved, ratio, ratio_cell
from memory import LLAMA
from unlearn.config.settings import LoraSettings, TrainConfig
from unlearn.data.batching import ExampleStream
from unlearn.methods import get_method
from unlearn.methods.base import Method, MethodEnv, Phase, Reference
from unlearn.methods.registry import method_names
from unlearn.models.gradient_checkpointing import enable_gradient_checkpointing
from unlearn.models.lora import attach_lora
from unlearn.readouts.affine import AffineMaps
from unlearn.readouts.tuned_lens import TunedLens
from unlearn.training.frozen_cache import FrozenCache
from unlearn.training.loop import Plan, TrainState, train
from unlearn.training.optim import build_optimizer
from unlearn.training.precision import match_frozen_copy

SMALL = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
    tie_word_embeddings=False,
)  # fmt: skip
LLAMA_1B = dict(
    vocab_size=16000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
    tie_word_embeddings=False,
)  # fmt: skip
"""Llama-3.2-1B's blocks (GQA with 8 key/value heads) with the ~100M config's vocabulary."""


@dataclass(frozen=True)
class Size:
    config: dict
    tokens: int
    """Default tokens per example."""
    pdbs: int
    """Default examples per micro-batch (each of forget and retain)."""


SIZES = {
    "small": Size(SMALL, 64, 2),
    "100m": Size(LLAMA, 512, 8),
    "1b": Size(LLAMA_1B, 512, 8),
}
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
)
"""Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendor's data sheets, by a
substring of `torch.cuda.get_device_name()`; the first match wins (PCIe and NVL before SXM)."""
UNCACHED_TARGET, CACHED_TARGET = 1.3, 1.05
_OPTIM_DEFAULTS = inspect.signature(build_optimizer).parameters
BETAS, EPS = _OPTIM_DEFAULTS["betas"].default, _OPTIM_DEFAULTS["eps"].default
"""unlearn's AdamW settings, which the plain step's torch.optim.AdamW takes too."""


def peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None when it is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def mfu(params: int, tokens_per_s: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: 6 x params x tokens/s over `devices` devices' peak (TFLOP/s)."""
    if peak is None:
        return None
    return 6 * params * tokens_per_s / (peak * 1e12 * devices)


def config_for(model: str):
    """A transformers config: a size name of SIZES, or a model directory's config.json."""
    from transformers import AutoConfig, LlamaConfig

    if model in SIZES:
        return LlamaConfig(**SIZES[model].config)
    if not (Path(model) / "config.json").is_file():
        sys.exit(f"throughput: --model {model}: not one of {', '.join(SIZES)} nor a model dir")
    return AutoConfig.from_pretrained(model)


def random_model(config, seed: int, device: torch.device) -> nn.Module:
    """A randomly initialised model of `config`, built on `device` (fast for 1B on a GPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config)
    return model.float()  # float32 master weights whatever dtype a directory's config names


# -- the plain step: transformers + torch only --------------------------------------------------


def plain_steps(
    model: nn.Module,
    forget: ExampleStream,
    retain: ExampleStream,
    cfg: TrainConfig,
    steps: int,
    device: torch.device,
) -> float:
    """Seconds per step of plain fine-tuning: one untimed step, then `steps` timed ones on the
    micro-batches unlearn's loop draws at the same steps (k = 1, 2, ...)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=BETAS, eps=EPS, weight_decay=cfg.weight_decay
    )
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    model.train()
    t0 = 0.0
    for k in range(1, steps + 2):
        if k == 2:
            _sync(device)
            t0 = time.perf_counter()
        with autocast:
            loss = sum(_lm_loss(model, b.to(device)) for b in (forget.batch(k), retain.batch(k)))
        loss.backward()
        loss.item()  # a training loop logs its loss (unlearn's logs each term)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _lm_loss(model: nn.Module, batch) -> torch.Tensor:
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    # No KV cache: a training forward has no use for one (unlearn's forwards skip it too).
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels,
        use_cache=False,
    )  # fmt: skip
    return out.loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- a method's step: unlearn's training loop ---------------------------------------------------


def method_steps(
    bench: Bench,
    method: Method,
    forget: ExampleStream,
    retain: ExampleStream,
    cfg: TrainConfig,
    steps: int,
    cache: FrozenCache | None,
) -> float:
    """Seconds per step of `method` through `training.loop.train`, timed like `plain_steps`."""
    first = method.phases(1)[0]
    total = steps + 2  # started at step 1: the run's first step computes frozen outputs live
    plan = Plan(len(forget.examples), total, [Phase(first.name, total, first.layer)], cfg.pdbs, 1)
    marks: list[float] = []

    def on_step(step: int) -> None:
        if step == 2:  # after the untimed step
            _sync(bench.device)
            marks.append(time.perf_counter())

    with contextlib.redirect_stderr(io.StringIO()):  # the plan it prints on every call
        train(bench.model, method, bench.reference, forget, retain, cfg, plan,
              state=TrainState(step=1), on_step=on_step, progress=False, device=bench.device,
              frozen_cache=cache)  # fmt: skip
    _sync(bench.device)
    return (time.perf_counter() - marks[0]) / steps


# -- models, helpers and methods ------------------------------------------------------------------


@dataclass
class Bench:
    """One mode's model (shared by every kind of that mode) and what restores it."""

    mode: str
    model: nn.Module
    reference: Reference
    device: torch.device
    trainable: set[str]
    """Parameters the mode trains (LoRA: the adapters; full: all)."""
    initial: dict[str, torch.Tensor]
    """The initial weights (on the CPU), restored before every timed call."""

    def prepare(self, method: Method | None) -> None:
        """Initial weights back; trainable parameters as the mode and `method` say (None:
        plain fine-tuning, every parameter the mode trains)."""
        with torch.no_grad():
            for name, t in self.model.state_dict().items():
                t.copy_(self.initial[name])
        for name, p in self.model.named_parameters():
            train = name in self.trainable and (method is None or method.trainable(name))
            p.requires_grad_(train)


def build_bench(mode: str, config, cfg: TrainConfig, device: torch.device) -> Bench:
    """The model of one mode, set up as unlearn's recipe sets up a run's (checkpointing before
    LoRA; full fine-tuning's reference a frozen copy that computes as the trained model)."""
    model = random_model(config, 0, device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # The reference's identity for the frozen cache (in memory only, this process).
    key = {"model": f"random {config.model_type} seed 0", "dtype": "float32",
           "device": device.type, "mixed_precision": cfg.mixed_precision, "mode": mode}  # fmt: skip
    if mode == "lora":
        model = attach_lora(model, LoraSettings())
        reference = Reference(model, key=key)
    else:
        model.requires_grad_(True)
        frozen = match_frozen_copy(copy.deepcopy(model), cfg.mixed_precision, "none")
        reference = Reference(model, frozen_copy=frozen, key=key)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return Bench(mode, model, reference, device, trainable, initial)


def _identity_lens(method: Method, bench: Bench, env: MethodEnv) -> None:
    Method.setup(method, bench.model, env)  # depth and target layers
    method.lens = TunedLens.for_model(bench.model, method.layers).requires_grad_(False)  # type: ignore[attr-defined]


def _random_source(method: Method, bench: Bench, env: MethodEnv) -> None:
    Method.setup(method, bench.model, env)
    config = bench.model.config
    method.source = random_model(config, 1, env.device).requires_grad_(False).eval()  # type: ignore[attr-defined]
    d = config.hidden_size
    g = torch.Generator().manual_seed(3)
    layers = method.layers
    method.maps = AffineMaps(  # type: ignore[attr-defined]
        layers=layers,
        weights={i: torch.randn(d, d, generator=g) / d**0.5 for i in layers},
        biases={i: torch.zeros(d) for i in layers},
        alpha=0.0, d_in=d, d_out=d,
        heldout_mse=dict.fromkeys(layers, 0.0), heldout_target_var=dict.fromkeys(layers, 1.0),
        source="random source", target="random model", fit_tokens=1, heldout_tokens=1,
    )  # fmt: skip
    # Set up by hand, a method has no source identity and would never cache its targets.
    key = {"model": "random source seed 1", "dtype": "float32", "device": env.device.type,
           "mixed_precision": env.mixed_precision}  # fmt: skip
    method.source_key = key  # type: ignore[attr-defined]


STAND_INS: dict[str, Callable[[Method, Bench, MethodEnv], None]] = {
    "lens": _identity_lens,
    "checkpoint_transfer": _random_source,
}
"""`setup` of the methods whose helpers are fitted on a world or loaded from the hub."""


def build_method(name: str, bench: Bench, env: MethodEnv) -> Method:
    cls = get_method(name)
    method = cls(cls.config_cls())
    stand_in = STAND_INS.get(name)
    if stand_in is not None:
        stand_in(method, bench, env)
    else:
        method.setup(bench.model, env)
    return method


def method_mode(name: str, mode: str) -> str:
    """`mode`, or with "default" the method's documented one."""
    if mode != "default":
        return mode
    lora = get_method(name).train_defaults.get("lora", LoraSettings.lora)
    return "lora" if lora else "full"


# -- measuring ------------------------------------------------------------------------------------


@dataclass
class Row:
    kind: str
    """plain, method (frozen outputs computed) or cached (the frozen cache warm)."""
    method: str | None
    mode: str
    timings: list[Timed]
    base: str
    """The plain kind of the same mode (the ratio's denominator)."""


def measure(args: argparse.Namespace) -> tuple[list[Row], dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = config_for(args.model)
    mp = args.mixed_precision
    if mp == "auto":
        mp = "bf16" if device.type == "cuda" else "no"
    cfg = TrainConfig(lr=1e-4, pdbs=args.pdbs, grad_accum=1, max_steps=args.steps + 2,
                      max_length=args.tokens, mixed_precision=mp,
                      gradient_checkpointing=args.gradient_checkpointing)  # fmt: skip
    names = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(names) - set(method_names()))
    if unknown:
        sys.exit(f"throughput: unknown methods {unknown} (registered: {method_names()})")
    modes = {name: method_mode(name, args.mode) for name in names}

    # Random token ids: as many examples per side as the calls draw (k = 1 .. steps + 1).
    g = torch.Generator().manual_seed(1)
    n = (args.steps + 2) * args.pdbs

    def stream(seed: int) -> ExampleStream:
        ids = torch.randint(1, config.vocab_size, (n, args.tokens), generator=g).tolist()
        return ExampleStream(ids, args.pdbs, 0, seed)

    forget, retain = stream(0), stream(1)
    tokens = forget.batch(1).num_tokens + retain.batch(1).num_tokens  # the same every step

    benches = {m: build_bench(m, config, cfg, device) for m in sorted(set(modes.values()))}
    env = MethodEnv(model_name="random", tokenizer=None, device=device, dtype="float32",
                    mixed_precision=mp)  # fmt: skip
    methods = {name: build_method(name, benches[modes[name]], env) for name in names}
    caches = {name: FrozenCache(None, memory_gb=args.cache_gb) for name in names}
    peak = PeakMemory(device)
    # Per method, per call of its cached kind: (lookups, misses) in its frozen cache.
    lookups: dict[str, list[tuple[int, int]]] = {name: [] for name in names}

    def run(kind: str) -> Timed:
        what, _, mode_or_name = kind.partition(":")
        if what == "plain":
            bench = benches[mode_or_name]
            bench.prepare(None)
            peak.start()
            seconds = plain_steps(bench.model, forget, retain, cfg, args.steps, device)
            return Timed(seconds, peak.stop())
        name = mode_or_name
        bench, cache = benches[modes[name]], caches[name] if what == "cached" else None
        bench.prepare(methods[name])
        hits, misses = caches[name].hits, caches[name].misses
        peak.start()
        seconds = method_steps(bench, methods[name], forget, retain, cfg, args.steps, cache)
        timed = Timed(seconds, peak.stop())
        if cache is not None:
            new_misses = cache.misses - misses
            lookups[name].append((cache.hits - hits + new_misses, new_misses))
        return timed

    kinds = [f"plain:{m}" for m in benches]
    for name in names:
        kinds += [f"method:{name}", f"cached:{name}"]
    # Warm-up of the cached kinds only: it fills each method's frozen cache. Every call already
    # runs an untimed first step, so the other kinds need none.
    for kind in kinds:
        if kind.startswith("cached:"):
            run(kind)
    # No lookup at all: nothing the method computes is cacheable at this size. (Misses would not
    # tell: the caches share one in-memory store, so a method may find every entry another
    # method with the same frozen outputs left.)
    nothing_cached = {name for name in names if not lookups[name][0][0]}
    kinds = [k for k in kinds if not (k.startswith("cached:") and k[7:] in nothing_cached)]
    timed = interleaved(kinds, run, args.rounds, warmup=False)
    missed = sorted(name for name in names if any(m for _, m in lookups[name][1:]))
    if missed:
        sys.exit(f"throughput: the warm frozen cache missed for {missed}: raise --cache_gb")

    rows = []
    for kind, timings in timed.items():
        what, _, rest = kind.partition(":")
        mode = rest if what == "plain" else modes[rest]
        method = None if what == "plain" else rest
        rows.append(Row(what, method, mode, timings, f"plain:{mode}"))
    params = sum(p.numel() for p in random_model(config, 0, torch.device("meta")).parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    facts = {
        "device": device.type, "device_name": name, "params": params, "tokens": tokens,
        "mixed_precision": mp, "peak_tflops": peak_tflops(name) if device.type == "cuda" else None,
        "nothing_cached": sorted(nothing_cached), "per_call_memory": peak.per_call,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    return rows, facts


def table(rows: list[Row], facts: dict, args: argparse.Namespace) -> str:
    times = {f"{r.kind}:{r.method or r.mode}": [t.seconds for t in r.timings] for r in rows}
    on = facts["device_name"]
    if facts["device"] == "cpu":
        on += f", {facts['threads']} threads"
    model = args.model if args.model in SIZES else Path(args.model).name
    setting = [f"mixed precision {facts['mixed_precision']}"]
    if args.gradient_checkpointing:
        setting.append("activation checkpointing")
    lines = [
        f"Throughput on {on}: a random Llama ({model}, {facts['params'] / 1e6:.1f}M parameters),"
        f" micro-batches of {args.pdbs} x {args.tokens} tokens of forget and as many of retain"
        f" ({facts['tokens']} tokens a step), {', '.join(setting)}; {args.rounds} interleaved"
        f" rounds of {args.steps} timed steps per kind (bench/throughput.py). Ratio: step time /"
        " plain fine-tuning's in the same round, median [min-max]; targets: uncached <="
        f" {UNCACHED_TARGET}, cached <= {CACHED_TARGET}. Step memory: what the steps added"
        " above the weights held before them"
        + ("" if facts["per_call_memory"] else " (process-wide peak: not reset between kinds)")
        + ".",
        "",
        "| step | mode | tokens/s | s / step | / plain fine-tuning | target | step memory (MiB)"
        " | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key = f"{r.kind}:{r.method or r.mode}"
        seconds = statistics.median(times[key])
        tps = facts["tokens"] / seconds
        share = mfu(facts["params"], tps, facts["peak_tflops"])
        mfu_cell = "unknown device" if facts["device"] == "cuda" else "CUDA only"
        if share is not None:
            mfu_cell = f"{100 * share:.1f}%"
        memory = f"{max(t.peak_bytes for t in r.timings) / 2**20:,.0f}"
        if r.kind == "plain":
            label, ratio_text, target = "plain fine-tuning", "1", ""
        else:
            label = r.method + (", frozen cache warm" if r.kind == "cached" else "")
            limit = CACHED_TARGET if r.kind == "cached" else UNCACHED_TARGET
            ratio_text = ratio_cell(times, key, r.base)
            met = ratio(times, key, r.base)[0] <= limit
            target = f"<= {limit}: " + ("met" if met else "NOT met")
        lines.append(f"| {label} | {r.mode} | {tps:,.0f} | {seconds:.4f} | {ratio_text} |"
                     f" {target} | {memory} | {mfu_cell} |")  # fmt: skip
    if facts["nothing_cached"]:
        which = ", ".join(facts["nothing_cached"])
        lines += ["", f"Nothing to cache for {which}: no frozen model's output in the loss, or"
                  " only KL retain logits over the cache's per-example limit; the cached step is"
                  " the uncached one."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="100m",
                        help=f"{', '.join(SIZES)}, or a model directory (its config, random"
                        " weights)")  # fmt: skip
    parser.add_argument("--small", action="store_true", help="--model small (checks the code)")
    parser.add_argument("--methods", default=",".join(method_names()))
    parser.add_argument("--mode", choices=("default", "full", "lora"), default="default",
                        help="default: each method's documented mode")  # fmt: skip
    parser.add_argument("--tokens", type=int, help="tokens per example (default: by size)")
    parser.add_argument("--pdbs", type=int, help="examples per micro-batch (default: by size)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per call")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (odd: a median)")
    parser.add_argument("--mixed_precision", choices=("auto", "no", "bf16"), default="auto",
                        help="auto: bf16 on CUDA, no on the CPU")  # fmt: skip
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--cache_gb", type=float, default=4.0,
                        help="memory of the frozen caches (all methods together)")  # fmt: skip
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    if args.small:
        args.model = "small"
    size = SIZES.get(args.model, Size({}, 512, 8))
    args.tokens = args.tokens or size.tokens
    args.pdbs = args.pdbs or size.pdbs
    if min(args.steps, args.rounds, args.tokens, args.pdbs) < 1:
        parser.error("--steps, --rounds, --tokens and --pdbs must be >= 1")
    rows, facts = measure(args)
    text = table(rows, facts, args)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
