"""`unlearn eval`: evaluate a model on the mini world's forget/retain questions or on benchmarks.

    unlearn eval --model PATH --world DIR --output OUT.json
    unlearn eval --baselines --world DIR          # target, ignorant checkpoint, filtered twin
    unlearn eval --model PATH --world DIR --backend lm-eval        # the same tasks through lm-eval
    unlearn eval --model ID --backend lm-eval --tasks mmlu,wmdp_bio_robust

Writes `{"results": {task: {"acc", "acc_norm", "correct_prob", "n", ...}}}` (a perplexity task,
`--tasks ppl:FILE` or a world's general_ppl: `{"ppl", "nll", "tokens", "n"}`, shown as a number,
lower is better); a collapsed model (one answer position or string for nearly all questions) is
flagged in the output and the table.
With lm-eval a task that fails is written as `{"status": "failed", "error": ...}` (never a
number) and the command exits 1; a benchmark whose dataset is not cached offline exits 2.
See docs/evaluation.md.
"""

from __future__ import annotations

import sys

from unlearn.commands.arguments import ArgumentParser
from unlearn.distributed import is_main, join_for_evaluation
from unlearn.recipes.evaluation import EvalConfig, evaluate
from unlearn.report.tables import results_table


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn eval", description=__doc__)
    parser.add_arguments(EvalConfig, dest="cfg")
    cfg: EvalConfig = parser.parse_args(argv).cfg
    join_for_evaluation(cfg.backend)  # under torchrun: questions sharded over the ranks
    evaluation = evaluate(cfg)
    if not is_main():  # data parallel: rank 0 holds the gathered results and reports them
        return 0
    rows = {k: o["results"] for k, o in evaluation.outputs.items()}
    print(results_table(rows, evaluation.tasks, evaluation.roles))
    for label in evaluation.collapsed:
        print(
            f"warning: {label} looks collapsed (one answer for nearly all questions)",
            file=sys.stderr,
        )
    for label, task, error in evaluation.failed:
        print(f"error: {label}: task {task} failed: {error}", file=sys.stderr)
    if evaluation.output is not None:
        print(f"wrote {evaluation.output}")
    return 1 if evaluation.failed else 0
