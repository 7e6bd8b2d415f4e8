"""Native evaluator vs lm-eval on the mini world's tasks: same accuracies, and how much faster.

    .venv/bin/python bench/eval_speed.py --world /tmp/w [--model PATH] [--repeats 3]

Loads the model once (the world's target by default), then evaluates every world task with each
backend `--repeats` times and keeps the fastest run of each (the first lm-eval run also fills the
datasets cache). lm-eval's time is split into preparing the tasks (index, reading the question
JSONL into a dataset) and evaluating them; the ratio is given for both the total and the
evaluation alone. Prints both backends' accuracies per task and exits 1 if any differ.
"""

from __future__ import annotations

import argparse
import sys
import time


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", required=True, help="mini world directory")
    parser.add_argument("--model", help="model directory (default: the world's target)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per backend (fastest kept)")
    parser.add_argument("--batch_size", type=int, default=64, help="choices per forward pass")
    args = parser.parse_args(argv)

    from unlearn.eval import harness
    from unlearn.models import load_model, load_tokenizer, resolve_model
    from unlearn.world import evaluate_world, load_world

    world = load_world(args.world)
    ref = resolve_model(args.model or world.target, world_dir=world.root)
    model, tokenizer = load_model(ref), load_tokenizer(ref)
    tasks = list(world.questions)
    options = harness.HarnessOptions(batch_size=args.batch_size)

    native_s, prepare_s, lm_eval_s = [], [], []
    for _ in range(args.repeats):
        native, t = timed(evaluate_world, model, tokenizer, world, tasks, args.batch_size)
        native_s.append(t)
        prepared, t = timed(harness.prepare_tasks, tasks, world)
        prepare_s.append(t)
        lm, t = timed(harness.evaluate_prepared, model, tokenizer, prepared, options)
        lm_eval_s.append(t)

    failed = harness.failed_tasks(lm)
    if failed:
        print(f"lm-eval failed: {failed}", file=sys.stderr)
        return 1
    n_questions = sum(native[t]["n"] for t in tasks)
    print(f"model {ref} on {world.root} ({n_questions} questions, 4 choices each)\n")
    print("| task | n | native acc | lm-eval acc | same | native p(correct) | lm-eval p(correct) |")
    print("|---|---|---|---|---|---|---|")
    equal = True
    for t in tasks:
        a, b = native[t], lm[t]
        same = a["acc"] == b["acc"] and a["acc_norm"] == b["acc_norm"]
        equal &= same
        print(
            f"| {t} | {a['n']} | {a['acc']:.4f} | {b['acc']:.4f} | {'yes' if same else 'NO'} "
            f"| {a['correct_prob']:.6f} | {b['correct_prob']:.6f} |"
        )
    best_native, best_prep, best_eval = min(native_s), min(prepare_s), min(lm_eval_s)
    print(
        f"\nwall time, fastest of {args.repeats}: native {best_native:.3f} s; lm-eval "
        f"{best_prep + best_eval:.3f} s ({best_prep:.3f} s preparing tasks + {best_eval:.3f} s "
        "evaluating)"
    )
    print(
        f"speed ratio native/lm-eval: {(best_prep + best_eval) / best_native:.1f}x faster "
        f"in total, {best_eval / best_native:.1f}x on evaluation alone"
    )
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
