"""`unlearn attack`: fine-tuning (tamper) attack with an evaluation curve.

    unlearn attack --model /tmp/r1/model --world /tmp/w --out /tmp/a1
    unlearn attack --model /tmp/r1/model --world /tmp/w --out /tmp/a1 --optimizer muon --lora true

Fine-tunes on the world's attack-group documents (or --corpus), evaluating at step 0 and every
--eval_every steps; the curve is in OUT/evals.jsonl and, with --store, in the results store.
"""

from __future__ import annotations

from unlearn.cliutil import ArgumentParser
from unlearn.config import LoraSettings, TrainConfig
from unlearn.distributed import is_main
from unlearn.recipes.attack import ATTACK_TRAIN_DEFAULTS, AttackArgs, AttackConfig, run_attack
from unlearn.resume import exit_code


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn attack", description=__doc__)
    parser.add_arguments(AttackArgs, dest="args")
    parser.add_arguments(TrainConfig, dest="train", default=TrainConfig(**ATTACK_TRAIN_DEFAULTS))
    parser.add_arguments(LoraSettings, dest="lora", default=LoraSettings(lora=False))
    ns = parser.parse_args(argv)
    meta = run_attack(AttackConfig(ns.args, ns.train, ns.lora))
    if is_main():  # under torchrun only rank 0 reports
        print(f"attack {meta.id}: {meta.status}" + (f" ({meta.error})" if meta.error else ""))
    return exit_code(meta.status, ok=("done",))
