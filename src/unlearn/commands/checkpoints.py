"""`unlearn checkpoints`: find the latest pretraining checkpoint that is still ignorant.

    unlearn checkpoints --world /tmp/w                                  # the world's checkpoints
    unlearn checkpoints --model EleutherAI/deep-ignorance-unfiltered \\
        --revisions global_step38144,global_step50064,global_step54832,global_step57216
    unlearn checkpoints --paths ckpt/step1000 ckpt/step2000 --world /tmp/w

Each checkpoint is evaluated on a forget task and a retain task, in the order given (training
order), and the table of the reference campaign is printed (and written with --out):

    | Checkpoint | forget | retain | Notes |
    | step-00300 | 22.92% | 93.52% | ~Random (latest viable) |

(Notes: ~Random, ~Random (latest viable), Learning starts).

Design choices:

- "Viable" = forget accuracy within `margin` of chance: the checkpoint has not learned the forget
  domain, so it can serve as the source of checkpoint activation transfer. The latest viable one
  is the latest such checkpoint (it knows the most of everything else). "Learning starts" marks
  the first checkpoint after it that is above the band.
- Default margin: two standard errors of an at-chance accuracy over the task's questions,
  2 x sqrt(c (1 - c) / n), at least one point: an at-chance model stays inside the band about 97%
  of the time, whatever the number of questions (about 2.4 points on WMDP-Bio-Robust's 1,270; 12.5
  on the tiny world's 48). Give --margin to fix it.
- Chance: on a world task (either backend), the mean of 1 / (number of choices) over the forget
  questions; on lm-eval benchmarks, --chance (default 0.25: four-choice questions).
- Backends: the native evaluator on a world's tasks (default with --world), or lm-eval tasks
  (`--backend lm-eval`, defaults wmdp_bio_robust and mmlu) through `unlearn.eval.harness`. A failed
  evaluation is shown as failed and never counts as at chance.
- With --store each checkpoint is recorded as a baseline run (role "checkpoint") with its two
  evaluations, so the report can list them next to the runs.
"""

from __future__ import annotations

from unlearn.commands.arguments import ArgumentParser
from unlearn.recipes.source_checkpoints import CheckpointsConfig, find_checkpoints


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn checkpoints", description=__doc__)
    parser.add_arguments(CheckpointsConfig, dest="cfg")
    cfg: CheckpointsConfig = parser.parse_args(argv).cfg
    result = find_checkpoints(cfg)
    print(result.table)
    print(
        f"{result.verdict} (chance {100 * result.chance:.2f}%,"
        f" margin {100 * result.margin:.2f} points)"
    )
    if result.out is not None:
        print(f"wrote {result.out}/checkpoints.json and checkpoints.md")
    return 0 if result.latest is not None else 1
