"""Cost of one unlearning optimizer step relative to one plain fine-tuning step.

    .venv/bin/python bench/step_cost.py --world /tmp/w [--methods lens,sequential] [--rounds 7]
    .venv/bin/python bench/step_cost.py --world /tmp/w --methods rmu+lat_eps=4,npo+sam_rho=0.01

A `--methods` entry is a method name, optionally followed by `+FIELD=VALUE` run settings (a
step modifier such as `lat_eps` or `sam_rho`, or any `unlearn run` field; VALUE is read as YAML):
the step is then that method's step with those settings.

For each method and mode (LoRA / full), one process times three kinds of optimizer steps on the
same forget + retain micro-batches, same optimizer, same mode:
- method: the method's step, frozen work (source activations, reference outputs) computed;
- cached: the method's step with the frozen cache warm (unlearn.training.frozen_cache), as in
  every epoch after the first and every sweep point after the first on the same examples;
- plain: next-token CE on the forget and the retain micro-batch (plain fine-tuning).

Built to be trusted on a noisy shared machine: after a warm-up, the kinds are *interleaved*
(each round times `--steps` steps of each, in a rotating order; bench/interleave.py, shared with
bench/throughput.py) so that a slow spell hits all of them alike, and each round gives one ratio
per kind; the table shows the median ratio over the rounds and its spread (min-max). The setup
(loading, fitting lenses/affine maps, cached in the world dir) is not timed. Peak memory per
kind: what its steps added on top of what was held before them (gradients, optimizer state,
activations, frozen outputs): CUDA allocated memory, or on the CPU resident memory
(bench/interleave.PeakMemory).

A ratio below 1 is possible and not an error: a method's forget forward stops after its deepest
target layer and reads no logits (checkpoint transfer, L2 retain), while the plain step runs the
whole model and the unembedding on both micro-batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from interleave import PeakMemory, Timed, interleaved, ratio_cell
from unlearn.methods.registry import method_names

METHODS = tuple(method_names())
"""Every registered method, from the registry (a new method is measured without an edit here)."""
MODES = ("lora", "full")
KINDS = ("method", "cached", "plain")


def parse_entry(entry: str) -> tuple[str, dict]:
    """`METHOD[+FIELD=VALUE...]` -> (method, run settings); ValueError on a malformed entry."""
    import yaml

    method, *settings = entry.split("+")
    overrides = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise ValueError(f"{entry!r}: expected METHOD+FIELD=VALUE, got {setting!r}")
        overrides[key] = yaml.safe_load(value)
    return method, overrides


def measure(world: str, entry: str, mode: str, steps: int, rounds: int, pdbs: int) -> dict:
    import torch

    from unlearn.objectives import get_objective
    from unlearn.recipes.unlearning import build_run_config, prepare, validate
    from unlearn.training import frozen_cache
    from unlearn.training.loop import Plan, TrainState, train

    method, settings = parse_entry(entry)
    with tempfile.TemporaryDirectory() as out:
        overrides = {
            **settings,
            "world": world,
            "out": out,
            "lora": mode == "lora",
            "pdbs": pdbs,
            "grad_accum": 1,
            "max_steps": steps,
            "progress": False,
            "frozen_cache": False,
        }
        cfg = build_run_config(method, overrides)
        p = prepare(cfg, validate(cfg), Path(out))
        phase = p.method.phases(1)[0]
        plain = get_objective("language_modeling")(with_retain=True)
        cache = frozen_cache.FrozenCache(Path(out) / "frozen-cache")
        cuda = p.device.type == "cuda"

        peak = PeakMemory(p.device)
        cached_misses: list[int] = []  # per call of the "cached" kind

        def run(kind: str) -> Timed:
            objective = plain if kind == "plain" else p.method
            # One step more, started after it: a run's first step computes its frozen outputs
            # live (StepContext.first_step), and the timed steps continue a trained model.
            phases = [type(phase)(phase.name, steps + 1, phase.layer)]
            plan = Plan(len(p.forget.examples), steps + 1, phases, pdbs, 1)
            misses = cache.misses
            peak.start()
            t0 = time.perf_counter()
            train(p.model, objective, p.reference, p.forget, p.retain, cfg.train, plan,
                  state=TrainState(step=1), progress=False, device=p.device,
                  frozen_cache=cache if kind == "cached" else None)  # fmt: skip
            if cuda:
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / steps
            if kind == "cached":
                cached_misses.append(cache.misses - misses)
            return Timed(seconds, peak.stop())

        timed = interleaved(KINDS, run, rounds)
        # The timed "cached" steps (every call after the warm-up) found every frozen output in
        # the cache.
        assert not any(cached_misses[1:]), "the frozen cache missed after the warm-up"
        times = {k: [t.seconds for t in ts] for k, ts in timed.items()}
        peaks = {k: max(t.peak_bytes for t in ts) / 2**20 for k, ts in timed.items()}
        return {"times": times, "peak_mb": peaks, "device": p.device.type,
                "cache_hits": cache.hits, "cache_misses": cache.misses}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timing")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (odd: a median)")
    parser.add_argument("--pdbs", type=int, default=8)
    parser.add_argument("--out", help="also write the markdown page here")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.pdbs < 1:
        parser.error("--steps, --rounds and --pdbs must be >= 1")
    try:
        for entry in args.methods.split(","):
            parse_entry(entry)
    except ValueError as e:
        parser.error(str(e))
    if args.one:
        res = measure(args.world, *args.one, args.steps, args.rounds, args.pdbs)
        print(json.dumps(res))
        return 0

    rows = []
    for method in args.methods.split(","):
        for mode in args.modes.split(","):
            flags = {"--world": args.world, "--steps": args.steps, "--rounds": args.rounds,
                     "--pdbs": args.pdbs}  # fmt: skip
            cmd = [sys.executable, __file__, *(str(x) for kv in flags.items() for x in kv),
                   "--one", method, mode]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append((method, mode, json.loads(proc.stdout.strip().splitlines()[-1])))
            print(f"measured {method} {mode}", file=sys.stderr)
    text = table(rows, args)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


def table(rows: list[tuple[str, str, dict]], args: argparse.Namespace) -> str:
    """The markdown page: what was measured, then one row per method and mode."""
    device = rows[0][2]["device"]
    # The world by its name (preset and seed): its path is this machine's.
    meta = json.loads((Path(args.world) / "world.json").read_text())
    lines = [
        "# Step cost of each method against plain fine-tuning",
        "",
        f"Step cost on {device}, micro-batch {args.pdbs} forget + {args.pdbs} retain examples of"
        f" the {meta['preset']} mini world (seed {meta['seed']}), {args.rounds} interleaved"
        f" rounds of {args.steps} steps per kind; ratio = median over rounds of (step / plain"
        " step of the same round) [min-max].",
        "An entry `METHOD+FIELD=VALUE` is the method's step with that run setting (a step"
        " modifier). cached: the frozen cache warm (every epoch after the first). Step memory:"
        " what the steps add to what was held before them.",
        "",
        "| method | mode | plain FT step (s) | method / plain | cached / plain |"
        " step memory method / cached / plain (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for method, mode, res in rows:
        t, peak = res["times"], res["peak_mb"]
        cells = [ratio_cell(t, kind, "plain") for kind in ("method", "cached")]
        mem = " / ".join(f"{peak[k]:.0f}" for k in KINDS)
        lines.append(f"| {method} | {mode} | {statistics.median(t['plain']):.4f} | {cells[0]} |"
                     f" {cells[1]} | {mem} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
