"""`unlearn attack`: fine-tuning (tamper) attack with an evaluation curve.

    unlearn attack --model /tmp/r1/model --world /tmp/w --out /tmp/a1
    unlearn attack --model /tmp/r1/model --world /tmp/w --out /tmp/a1 --optimizer muon --lora true

Fine-tunes on the world's attack-group documents (or --corpus), evaluating at step 0 and every
--eval_every steps; the curve is in OUT/evals.jsonl and, with --store, in the results store.

    unlearn attack --config attack.yaml --out /tmp/a2 --max_steps 100
    unlearn attack --config /tmp/a1 --world /tmp/w --out /tmp/a1-again

--config FILE takes the settings from a YAML mapping of the same flat names (relative paths
against its directory) or from an attack's run directory / run.json (a replay; not its out,
run_id or store; an attack's run.json does not record --world, so give it again). Flags given on
the command line override the file; the rules are in unlearn.config.files.
"""

from __future__ import annotations

from unlearn.commands.arguments import ArgumentParser
from unlearn.config.files import add_config_flag, add_sections, check_replay_out, pre_parse
from unlearn.config.settings import LoraSettings, TrainConfig
from unlearn.distributed import is_main
from unlearn.recipes.attack import ATTACK_TRAIN_DEFAULTS, AttackArgs, AttackConfig, run_attack
from unlearn.training.preemption import exit_code


def parse(argv: list[str] | None) -> AttackConfig:
    """--config first (its values become the defaults), then every flag."""
    _, file = pre_parse(argv, ArgumentParser(prog="unlearn attack", add_help=False), "attack")
    parser = ArgumentParser(prog="unlearn attack", description=__doc__)
    add_config_flag(parser)
    sections = {"args": AttackArgs, "train": TrainConfig, "lora": LoraSettings}
    add_sections(parser, sections, {**ATTACK_TRAIN_DEFAULTS, "lora": False}, file, "attack config")
    ns = parser.parse_args(argv)
    check_replay_out(file, ns.args.out)
    return AttackConfig(ns.args, ns.train, ns.lora)


def main(argv: list[str] | None = None) -> int:
    meta = run_attack(parse(argv))
    if is_main():  # under torchrun only rank 0 reports
        print(f"attack {meta.id}: {meta.status}" + (f" ({meta.error})" if meta.error else ""))
    return exit_code(meta.status, ok=("done",))
