"""Cost of one unlearning optimizer step relative to one plain fine-tuning step.

    .venv/bin/python bench/step_cost.py --world /tmp/w [--methods lens,sequential] [--steps 5]

For each method and mode (LoRA / full), time one optimizer step of the method and one plain
fine-tuning step (next-token CE on the same forget + retain micro-batches, same optimizer, same
mode), and report the ratio and the peak memory. Each measurement runs in its own process so peak
memory is its own (CUDA: max allocated; CPU: peak resident set size, which includes the model
load). The setup (loading, fitting lenses/affine maps, cached in the world dir) is not timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

METHODS = ("checkpoint_transfer", "lens", "sequential")
MODES = ("lora", "full")


def measure(world: str, method: str, mode: str, kind: str, steps: int, pdbs: int) -> dict:
    import torch

    from unlearn.finetune import LanguageModeling
    from unlearn.recipes.unlearning import build_run_config, prepare, validate
    from unlearn.train import Plan, train

    with tempfile.TemporaryDirectory() as out:
        overrides = {
            "world": world,
            "out": out,
            "lora": mode == "lora",
            "pdbs": pdbs,
            "grad_accum": 1,
            "max_steps": steps + 1,
            "progress": False,
        }
        cfg = build_run_config(method, overrides)
        p = prepare(cfg, validate(cfg), __import__("pathlib").Path(out))
        objective = p.method if kind == "method" else LanguageModeling(with_retain=True)
        phase = p.method.phases(1)[0]

        def run(n: int) -> float:
            plan = Plan(
                len(p.forget.examples), n, [type(phase)(phase.name, n, phase.layer)], pdbs, 1
            )
            if p.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train(
                p.model,
                objective,
                p.reference,
                p.forget,
                p.retain,
                cfg.train,
                plan,
                progress=False,
                device=p.device,
            )
            if p.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        run(1)  # warm-up (allocator, kernels, lazy init)
        if p.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = run(steps) / steps
        if p.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"seconds": seconds, "peak_mb": peak_mb, "device": p.device.type}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pdbs", type=int, default=8)
    parser.add_argument(
        "--one", nargs=3, metavar=("METHOD", "MODE", "KIND"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.world, *args.one, args.steps, args.pdbs)))
        return 0

    rows = []
    for method in args.methods.split(","):
        for mode in args.modes.split(","):
            res = {}
            for kind in ("method", "plain"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--world",
                    args.world,
                    "--steps",
                    str(args.steps),
                    "--pdbs",
                    str(args.pdbs),
                    "--one",
                    method,
                    mode,
                    kind,
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    return 1
                res[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((method, mode, res["method"], res["plain"]))
            print(f"measured {method} {mode}", file=sys.stderr)
    device = rows[0][2]["device"]
    print(
        f"\nstep cost on {device}, micro-batch {args.pdbs} forget + {args.pdbs} retain examples,"
        f" mean of {args.steps} steps\n"
    )
    print(
        "| method | mode | step (s) | plain FT step (s) | ratio | peak mem method (MB) |"
        " peak mem plain (MB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for method, mode, m, pl in rows:
        print(
            f"| {method} | {mode} | {m['seconds']:.4f} | {pl['seconds']:.4f} |"
            f" {m['seconds'] / pl['seconds']:.2f} | {m['peak_mb']:.0f} | {pl['peak_mb']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
