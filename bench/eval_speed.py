"""Native evaluator vs lm-eval: the same accuracies, and how much faster the native path is.

    .venv/bin/python bench/eval_speed.py --world /tmp/w [--model PATH] [--repeats 3]
    .venv/bin/python bench/eval_speed.py --mmlu 1000 [--repeats 3]
    .venv/bin/python bench/eval_speed.py --world /tmp/w --out report.md   # also a markdown page

Two workloads, each timed with both backends `--repeats` times (fastest run kept; the first
lm-eval run also fills the datasets cache). The native evaluator keeps a suite's encoded requests
for the next evaluation with the same tokenizer (`unlearn.eval.encoding`), as in a campaign's
attack curves: its first run (tokenising) and its fastest later run are both reported.

- `--world W`: every world task (cloze) on the world's target (or `--model`);
- `--mmlu N` (default 1000): N synthetic MMLU-format questions (`{question, choices, answer}`,
  four options, scored as letter multiple choice: "Answer:" then " A".." D") in a local question
  file, on a random 4-layer Llama (hidden 64) with a tokenizer trained on the questions.

lm-eval's time is split into preparing the tasks (index, reading the question file into a
dataset) and evaluating them; the ratio is given for both the total and the evaluation alone.
Prints both backends' accuracies per task and exits 1 if any differ.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

TOPICS = ("cell", "virus", "river", "market", "planet", "engine", "protein", "harbor", "crystal")
WORDS = ("red", "small", "ancient", "northern", "rapid", "quiet", "dense", "bright", "hollow")


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def mmlu_questions(n: int, seed: int = 0) -> list[dict]:
    """Synthetic questions in the MMLU schema (nothing from the benchmark itself)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, word = rng.choice(TOPICS), rng.choice(WORDS)
        options = rng.sample([f"the {w} {t}" for w in WORDS for t in TOPICS], 4)
        question = f"Question {i}: which of these is most like a {word} {topic}?"
        rows.append({"question": question, "choices": options, "answer": rng.randrange(4)})
    return rows


def tiny_llama(texts: list[str], out: Path) -> Path:
    """A random 4-layer Llama (hidden 64) and a BPE tokenizer trained on `texts`, saved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from unlearn.world.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=512)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def compare(name: str, model, tokenizer, suite_args, world, repeats: int, batch_size: int) -> bool:
    """Time and compare both backends on one suite; prints a table and the ratios."""
    from unlearn.eval import encoding, harness
    from unlearn.eval.suite import SuiteArgs, prepare_suite, resolve_suite

    args = {**suite_args, "eval_backend": "auto"}
    native_suite = prepare_suite(resolve_suite(SuiteArgs(**args), world, require_forget=False))
    lm_suite = resolve_suite(
        SuiteArgs(**{**args, "eval_backend": "lm-eval"}), world, require_forget=False
    )
    keys = native_suite.suite.task_keys()
    local = {t.key: ("cloze" if t.kind == "world" else t.kind, t.path) for t in lm_suite.tasks}
    options = harness.HarnessOptions(batch_size=batch_size)
    native_s, prepare_s, lm_eval_s = [], [], []
    encoding.clear_cache()  # the first native run tokenises the suite
    for _ in range(repeats):
        native, t = timed(native_suite.evaluate, model, tokenizer, batch_size)
        native_s.append(t)
        prepared, t = timed(harness.prepare_tasks, keys, None, (), local)
        prepare_s.append(t)
        lm, t = timed(harness.evaluate_prepared, model, tokenizer, prepared, options)
        lm_eval_s.append(t)
    failed = harness.failed_tasks(lm) or harness.failed_tasks(native)
    if failed:
        print(f"{name}: evaluation failed: {failed}", file=sys.stderr)
        return False
    n_questions = sum(native[k]["n"] for k in keys)
    print(f"\n## {name} ({n_questions} questions)\n")
    print("| task | n | native acc | lm-eval acc | same | native p(correct) | lm-eval p(correct) |")
    print("|---|---|---|---|---|---|---|")
    equal = True
    for k in keys:
        a, b = native[k], lm[k]
        same = a["acc"] == b["acc"] and a.get("acc_norm") == b.get("acc_norm")
        equal &= same
        print(
            f"| {k} | {a['n']} | {a['acc']:.4f} | {b['acc']:.4f} | {'yes' if same else 'NO'} "
            f"| {a['correct_prob']:.6f} | {b['correct_prob']:.6f} |"
        )
    best_prep, best_eval = min(prepare_s), min(lm_eval_s)
    lm_total = best_prep + best_eval
    cold = native_s[0]
    print(
        f"\nwall time: lm-eval {lm_total:.3f} s, fastest of {repeats} ({best_prep:.3f} s "
        f"preparing tasks + {best_eval:.3f} s evaluating); native {cold:.3f} s tokenising the "
        "suite (first run)"
        + (f", {min(native_s[1:]):.3f} s reusing it (fastest later run)" if repeats > 1 else "")
    )
    print(
        f"speed ratio native/lm-eval, first run: {lm_total / cold:.1f}x faster in total, "
        f"{best_eval / cold:.1f}x on evaluation alone"
    )
    if repeats > 1:
        warm = min(native_s[1:])
        print(
            f"speed ratio native/lm-eval, suite already tokenised: {lm_total / warm:.1f}x faster "
            f"in total, {best_eval / warm:.1f}x on evaluation alone"
        )
    return equal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", help="mini world directory (its tasks are one workload)")
    parser.add_argument("--model", help="model directory for the world (default: its target)")
    parser.add_argument("--mmlu", type=int, default=1000, help="MMLU-format questions (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per backend (fastest kept)")
    parser.add_argument("--batch_size", type=int, default=64, help="rows per forward pass")
    parser.add_argument("--out", help="also write what is printed here, as a markdown page")
    args = parser.parse_args(argv)
    if args.out:
        shown = " ".join(
            ["python bench/eval_speed.py", *(argv if argv is not None else sys.argv[1:])]
        )
        # Paths inside this checkout, relative to it: the page must not name this machine's.
        shown = shown.replace(f"{Path(__file__).resolve().parents[1]}/", "")
        buffer = io.StringIO()
        with contextlib.redirect_stdout(_Tee(sys.stdout, buffer)):
            ok = _run(args)
        page = (
            f"# Native evaluator against lm-eval\n\nProduced by `{shown}` on "
            f"{datetime.date.today().isoformat()} ({platform.machine()}, {os.cpu_count()} cores, "
            f"load {os.getloadavg()[0]:.1f} at the end).\n\n" + buffer.getvalue()
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(page)
        return 0 if ok else 1
    return 0 if _run(args) else 1


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)


def _run(args: argparse.Namespace) -> bool:

    import torch

    from unlearn.models.load import load_model, load_tokenizer
    from unlearn.models.refs import resolve_model
    from unlearn.world import load_world

    print(f"torch threads: {torch.get_num_threads()}")
    ok = True
    if args.world:
        world = load_world(args.world)
        ref = resolve_model(args.model or world.target, world_dir=world.root)
        model, tokenizer = load_model(ref), load_tokenizer(ref)
        tasks = {"other_tasks": list(world.questions)}
        what = args.model or f"the target of the {world.preset} mini world (seed {world.seed})"
        ok &= compare(f"world tasks, {what}", model, tokenizer, tasks, world, args.repeats,
                      args.batch_size)  # fmt: skip
    if args.mmlu:
        with tempfile.TemporaryDirectory(prefix="eval-speed-") as tmp:
            rows = mmlu_questions(args.mmlu)
            path = Path(tmp, "mmlu_format.jsonl")
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            texts = [r["question"] + " " + " ".join(r["choices"]) for r in rows]
            # Answer lines in the training text make " A".." D" single tokens, as in real
            # tokenizers (so every question is one row, all four letters read from it).
            answers = [f"Answer: {letter}" for letter in "ABCD"] * 200
            ref = resolve_model(str(tiny_llama([*texts, *answers], Path(tmp, "llama"))))
            model, tokenizer = load_model(ref), load_tokenizer(ref)
            tasks = {"other_tasks": [str(path)]}
            ok &= compare("MMLU format, random 4-layer Llama", model, tokenizer, tasks, None,
                          args.repeats, args.batch_size)  # fmt: skip
    return ok


if __name__ == "__main__":
    sys.exit(main())
