"""`unlearn run --method NAME ...`: unlearn a model with one method.

    unlearn run --method lens --world /tmp/w --out /tmp/r1
    unlearn run --method checkpoint_transfer --world /tmp/w --out /tmp/r2 \
        --retain_coef 5 --remove_coef 5

With --world and no other flag a method uses its documented default configuration (and fits the
lenses or affine maps it needs, cached in the world dir). Parameter names follow the reference
campaign: retain_coef, remove_coef, num_train_examples, pdbs, grad_accum, lr, lora_r, layers, ...

    unlearn run --config best.yaml --out /tmp/r3 --lr 1e-4
    unlearn run --config /tmp/r1 --out /tmp/r1-again

--config FILE takes the settings from a YAML mapping of the same flat names (relative paths
against its directory) or from a run directory's run.json (a replay: its method, unless --method
is given; not its out, run_id or store). Flags given on the command line override the file; the
rules are in unlearn.config.files.
"""

from __future__ import annotations

import dataclasses
import sys

from unlearn.commands.arguments import ArgumentParser
from unlearn.config.files import add_config_flag, add_sections, check_replay_out, pre_parse
from unlearn.config.settings import LoraSettings, TrainConfig
from unlearn.distributed import env_world_size, is_main
from unlearn.methods import REGISTRY, get_method
from unlearn.models.refs import meta_model_or_note
from unlearn.recipes.best_step import best_line
from unlearn.recipes.unlearning import RunArgs, RunConfig, run_unlearning, validate
from unlearn.runs.rundir import RunDir
from unlearn.training.memory_plan import PlanArgs, device_memory, plan_memory
from unlearn.training.preemption import exit_code


def parse(argv: list[str] | None) -> RunConfig:
    """The run's config from the command line (`parse_all` without the plan options)."""
    return parse_all(argv)[0]


def parse_all(argv: list[str] | None) -> tuple[RunConfig, PlanArgs]:
    """Two passes: --method and --config first, then the flags of that method's config (with
    the file's values as their defaults), and the memory plan's options (not part of the run)."""
    pre = ArgumentParser(prog="unlearn run", add_help=False)
    pre.add_argument("--method", default=None, choices=sorted(REGISTRY))
    known, file = pre_parse(argv, pre, "unlearn")
    # The command line's method, else the file's (a run.json replays its own method).
    method = known.method or (file.method if file else None) or "lens"
    method_cls = get_method(method)

    parser = ArgumentParser(prog="unlearn run", description=__doc__)
    add_config_flag(parser)
    sections = {"args": RunArgs, "train": TrainConfig, "lora": LoraSettings,
                "method_cfg": method_cls.config_cls}  # fmt: skip
    if file is not None:  # the method chosen above, whatever the file says
        file = dataclasses.replace(file, values={**file.values, "method": method})
    base = {**method_cls.train_defaults, "method": method}
    add_sections(parser, sections, base, file, f"{method} config")
    parser.add_arguments(PlanArgs, dest="plan")
    ns = parser.parse_args(argv)
    check_replay_out(file, ns.args.out)
    cfg = RunConfig(args=ns.args, train=ns.train, lora=ns.lora, method=ns.method_cfg)
    return cfg, ns.plan


def dry_run(cfg: RunConfig, plan_args: PlanArgs) -> int:
    """Every check a run makes before its weights load, then the memory plan; nothing is
    written or loaded."""
    validated = validate(cfg)
    model = meta_model_or_note(validated.model_ref, "no memory plan without its weights")
    if model is None:
        return 1
    plan = plan_memory(model, cfg.train, cfg.lora, env_world_size())
    print(plan.render(device_memory(plan_args)))
    return 0


def print_evals(run_dir: str) -> None:
    """One line per task: the run's final accuracy, or a perplexity task's ppl (a number, lower
    is better), or why there is none."""

    evals = [e for e in RunDir(run_dir).read().evals if e.metric in ("acc", "ppl")]
    # Rows are appended in step order: the final evaluation's row of a task replaces those of
    # evaluations during training (--eval_every).
    final = {(e.task, e.metric): e for e in evals}
    for e in final.values():
        if e.value is None:
            value = f"failed ({e.error})"
        else:
            value = f"{100 * e.value:.2f}%" if e.metric == "acc" else f"{e.value:.2f}"
        print(f"  {e.task:<16} {e.metric} {value}")


def main(argv: list[str] | None = None) -> int:
    cfg, plan_args = parse_all(argv)
    if plan_args.dry_run:
        return dry_run(cfg, plan_args)
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
    if (line := best_line(meta)) is not None:
        print(line)
    print_evals(cfg.args.out)
    return code


if __name__ == "__main__":
    sys.exit(main())
