"""`unlearn run --method NAME ...`: unlearn a model with one method.

    unlearn run --method lens --world /tmp/w --out /tmp/r1
    unlearn run --method checkpoint_transfer --world /tmp/w --out /tmp/r2 \
        --retain_coef 5 --remove_coef 5

With --world and no other flag a method uses its documented default configuration (and fits the
lenses or affine maps it needs, cached in the world dir). Parameter names follow the seeds:
retain_coef, remove_coef, num_train_examples, pdbs, grad_accum, lr, lora_r, layers, ...
"""

from __future__ import annotations

import dataclasses
import sys

from unlearn.cliutil import ArgumentParser
from unlearn.config import LoraSettings, TrainConfig
from unlearn.distributed import is_main
from unlearn.methods import REGISTRY, get_method
from unlearn.recipes.unlearning import RunArgs, RunConfig, run_unlearning
from unlearn.resume import exit_code
from unlearn.runs.rundir import RunDir


def parse(argv: list[str] | None) -> RunConfig:
    """Two passes: --method first, then the flags of that method's config."""
    pre = ArgumentParser(prog="unlearn run", add_help=False)
    pre.add_argument("--method", default="lens", choices=sorted(REGISTRY))
    known, _ = pre.parse_known_args(argv)
    method_cls = get_method(known.method)

    parser = ArgumentParser(prog="unlearn run", description=__doc__)
    parser.add_arguments(RunArgs, dest="args")
    defaults = method_cls.train_defaults
    train_defaults = {k: v for k, v in defaults.items() if k in _names(TrainConfig)}
    lora_defaults = {k: v for k, v in defaults.items() if k in _names(LoraSettings)}
    parser.add_arguments(TrainConfig, dest="train", default=TrainConfig(**train_defaults))
    parser.add_arguments(LoraSettings, dest="lora", default=LoraSettings(**lora_defaults))
    parser.add_arguments(method_cls.config_cls, dest="method_cfg")
    ns = parser.parse_args(argv)
    return RunConfig(args=ns.args, train=ns.train, lora=ns.lora, method=ns.method_cfg)


def print_evals(run_dir: str) -> None:
    """One line per task: the run's final accuracy, or a perplexity task's ppl (a number, lower
    is better), or why there is none."""

    evals = [e for e in RunDir(run_dir).read().evals if e.metric in ("acc", "ppl")]
    for e in evals:
        if e.value is None:
            value = f"failed ({e.error})"
        else:
            value = f"{100 * e.value:.2f}%" if e.metric == "acc" else f"{e.value:.2f}"
        print(f"  {e.task:<16} {e.metric} {value}")


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    meta = run_unlearning(cfg)
    code = exit_code(meta.status, ok=("done", "collapsed"))
    if not is_main():  # under torchrun only rank 0 reports
        return code
    print(f"run {meta.id}: {meta.status}" + (f" ({meta.error})" if meta.error else ""))
    if meta.final:
        print(
            "final loss terms: "
            + ", ".join(f"{k}={v:.4g}" for k, v in meta.final.items() if v is not None)
        )
    if meta.model_path:
        print(f"model: {meta.model_path}")
    print_evals(cfg.args.out)
    return code


if __name__ == "__main__":
    sys.exit(main())
