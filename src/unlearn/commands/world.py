"""`unlearn world build`: build a mini world (corpus, questions, tokenizer, models, baselines).

    unlearn world build --preset default --seed 0 --out worlds/default

Prints the baseline table (target, ignorant checkpoint, filtered twin) and the build time; the
same numbers are in DIR/world.json under "stats".
"""

from __future__ import annotations

from dataclasses import dataclass

from unlearn.commands.arguments import ArgumentParser
from unlearn.config.settings import check_seed
from unlearn.errors import UsageError
from unlearn.report.tables import results_table
from unlearn.world.build import build_world, check_out_dir
from unlearn.world.presets import get_preset


@dataclass
class WorldBuildConfig:
    """Options of `unlearn world build`."""

    out: str | None = None
    """World directory to write (replaced if it already holds a world)."""
    preset: str = "default"
    """World size and pretraining recipe: tiny (tests, under a minute) or default."""
    seed: int = 0
    """Seed of the generator, the model init and the data order."""
    threads: int | None = None
    """torch CPU threads (default: the preset's, tiny 1, default 2); results are reproducible
    for a fixed seed and thread layout. On a busy machine use one core: --threads 1 --sequential."""
    sequential: bool = False
    """Run phase 2's two pretrainings (target, filtered twin) one after the other in this
    process with all the threads each. Default: side by side in two processes with
    max(1, threads // 2) threads each, on a machine with 2+ cores or with --threads >= 2."""
    quiet: bool = False
    """No progress bars."""

    def __post_init__(self) -> None:
        if self.out is None:
            raise UsageError("--out DIR is required")
        get_preset(self.preset)
        check_seed(self.seed)
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn world", description=__doc__)
    parser.add_argument("action", choices=["build"], help="what to do (build a world)")
    parser.add_arguments(WorldBuildConfig, dest="cfg")
    args = parser.parse_args(argv)
    cfg: WorldBuildConfig = args.cfg

    check_out_dir(cfg.out)  # fail on a bad --out before generating anything
    world = build_world(
        cfg.preset,
        cfg.seed,
        cfg.out,
        progress=not cfg.quiet,
        threads=cfg.threads,
        parallel=False if cfg.sequential else None,
    )
    labels = {
        "target": "Target (to unlearn)",
        "ignorant": "Ignorant checkpoint (source)",
        "filtered": "Filtered twin",
    }
    baseline = world.stats["baseline"]
    tasks = [*world.questions, *world.perplexity]  # general_ppl: a number, lower is better
    print(results_table({labels[k]: v for k, v in baseline.items()}, tasks))
    seconds = world.stats["seconds"]
    print(
        f"built {cfg.preset} world (seed {cfg.seed}, {world.stats['params']:,} parameters) "
        f"in {seconds['total']:.0f} s -> {world.root}"
    )
    return 0
