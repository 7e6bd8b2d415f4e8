"""`unlearn distill`: UNDO's second stage for any unlearned model: perturb its weights, then
distil its outputs into them (docs/methods.md).

    unlearn distill --teacher runs/lens-1a2b3c --world /tmp/w --alpha 0.3 --out runs/lens-undo
    unlearn distill --teacher MODEL --corpus general.jsonl --forget_tasks q.jsonl --out D

The result is an unlearning run of method `distill` (OUT/model, evaluated, in the store with
--store), whose parent is the teacher's run; `unlearn robustness --model OUT/model` measures
what the distillation bought.
"""

from __future__ import annotations

from unlearn.commands.arguments import ArgumentParser
from unlearn.config.settings import TrainConfig
from unlearn.distributed import is_main
from unlearn.recipes.best_step import best_line
from unlearn.recipes.distill import DISTILL_TRAIN_DEFAULTS, DistillArgs, DistillConfig, run_distill
from unlearn.training.preemption import exit_code


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn distill", description=__doc__)
    parser.add_arguments(DistillArgs, dest="args")
    parser.add_arguments(TrainConfig, dest="train", default=TrainConfig(**DISTILL_TRAIN_DEFAULTS))
    ns = parser.parse_args(argv)
    meta = run_distill(DistillConfig(ns.args, ns.train))
    if is_main():
        fraction = meta.final.get("compute_fraction")
        cost = f", {100 * fraction:.1f}% of the world's pretraining compute" if fraction else ""
        print(
            f"distill {meta.id}: {meta.status}{cost}" + (f" ({meta.error})" if meta.error else "")
        )
        if (line := best_line(meta)) is not None:
            print(line)
    return exit_code(meta.status, ok=("done", "collapsed"))
