"""`unlearn demo`: the whole campaign on the mini world.

    unlearn demo                       # small preset, results in out/demo
    unlearn demo --preset default      # the research world (the docs/results pages')
    unlearn demo --preset tiny --out /tmp/d

Builds (or reuses) the world, evaluates the baselines, runs each seed method (its documented
default on the default preset, the settings calibrated for the small one, a 2-point sweep on the
tiny one) as one sweep, runs the `quick` (or `--suite`) robustness suite (docs/robustness.md) on
the best run of each method plus the filtered twin and the original target, and writes
OUT/report.md with its robustness scorecard and PNG plots. Re-running resumes: finished stages
are skipped. On the small preset the whole of it, world included, takes about 6 minutes on two
CPU cores (docs/results/demo-cold).

A method's best run is its lowest forget accuracy among the runs that keep EVERY retain task
(retain, retain_late, near_domain on a format-2 world) at or above the target's accuracy on that
task minus RETAIN_MARGIN; ties go to the higher minimum over the retain tasks.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from unlearn.commands.arguments import ArgumentParser
from unlearn.config.settings import check_seed
from unlearn.errors import UsageError
from unlearn.fsutil import check_writable_parent
from unlearn.recipes.campaign import (
    CampaignRobustness,
    baseline_runs,
    final_acc,
    print_err,
    retain_floors,
    write_spec,
)
from unlearn.report import render_report, summary
from unlearn.robustness.per_model import suite_inputs
from unlearn.robustness.suite import SUITES, FinetuneAttack
from unlearn.runs.store import Store, check_store
from unlearn.sweep.execute import SweepPreempted, run_sweep
from unlearn.sweep.spec import load_sweep
from unlearn.sweep.workers import WorkerPool, WorkerPoolExecutor, available_cores
from unlearn.training.preemption import EXIT_PREEMPTED
from unlearn.world import build_world, load_world
from unlearn.world.presets import get_preset

# The default preset runs each method once, at its documented default (README): on the format-2
# world the defaults need 384-512 steps each (lens, checkpoint transfer and sequential about
# 130, 110 and 100 s at one thread), so with the world build (about 280 s) a second point per
# method would take the cold demo past its 10-minute budget. The small preset (the demo's) runs
# each method once at the settings calibrated on it (docs/results/calibration-small): half the
# steps, which reach the default world's forget accuracies there (lens 33-35%, checkpoint transfer
# 48%, sequential 33% against 33%, 49% and 33%) with every retain task within the margin; the
# defaults themselves either break the margin (checkpoint transfer: near_domain -8 points) or
# forget less (sequential 49%). Grids are `unlearn sweep` specs (examples/); the tiny preset keeps
# two points per method to exercise the sweep machinery.
DEMO_SWEEPS = {
    "default": [
        {"method": "lens"},
        {"method": "checkpoint_transfer"},
        {"method": "sequential"},
    ],
    "small": [
        {"method": "lens", "base": {"num_train_examples": 2048}},
        {
            "method": "checkpoint_transfer",
            "base": {"num_train_examples": 2048, "retain_coef": 20.0},
        },
        {
            "method": "sequential",
            "base": {"num_train_examples": 512, "remove_coef": 20.0, "lr": 1e-3},
        },
    ],
    "tiny": [
        {"method": m, "base": {"max_steps": 20}, "grid": {"remove_coef": [5.0, 10.0]}}
        for m in ("lens", "checkpoint_transfer", "sequential")
    ],
}
BASELINE_SWEEPS = {
    "default": [{"method": m} for m in ("grad_diff", "npo", "simnpo", "rmu", "rr")],
    "tiny": [
        {"method": m, "base": {"max_steps": 20}, "grid": {"retain_coef": [5.0, 20.0]}}
        for m in ("grad_diff", "npo", "simnpo", "rmu", "rr")
    ],
}
"""`--campaign baselines`: the field's baselines at their documented defaults, in a
campaign of their own: beside the seed methods the cold demo would pass its 10 minutes."""
TAMPER_SWEEPS = {
    "default": [
        {"method": "repnoise"},
        {"method": "tar"},
        # The step modifiers on two baselines: a latent adversary at block 1 of 6, whose
        # outputs have a median norm of about 35 on the default world (so 4 is about 11%), and
        # a sharpness-aware step of 0.01 in weight space. Single points; the search
        # examples/searches/pareto-tamper.yaml explores both.
        {"method": "rmu", "base": {"lat_eps": 4.0}},
        {"method": "npo", "base": {"sam_rho": 0.01}},
    ],
    "tiny": [
        {"method": "repnoise", "base": {"max_steps": 20}},
        {"method": "tar", "base": {"max_steps": 20}},
        {"method": "rmu", "base": {"max_steps": 20, "lat_eps": 2.0}},
        {"method": "npo", "base": {"max_steps": 20, "sam_rho": 0.01}},
    ],
}
"""`--campaign tamper`: the tamper-resistant methods at their defaults, and the step modifiers
on two baselines."""
CAMPAIGNS = {"seed": DEMO_SWEEPS, "baselines": BASELINE_SWEEPS, "tamper": TAMPER_SWEEPS}
DEMO_SUITES = {
    "default": SUITES["quick"],
    "tiny": dataclasses.replace(
        SUITES["quick"],
        name="quick-tiny",
        attacks=(
            FinetuneAttack("forget", 1e-3, steps=20, eval_every=10),
            FinetuneAttack("benign", 1e-3, steps=10, eval_every=10),
        ),
    ),
}
"""The robustness suite run on each method's best run and on the references: `quick` (the
tiny preset shortens its attacks, for the test suite's demo)."""


def campaign_sweeps(campaign: str, preset: str) -> list[dict]:
    """The sweep entries of `campaign` on a world of `preset`: the preset's own where the
    campaign has them (calibrated or shortened), else the default preset's (documented
    defaults)."""
    sweeps = CAMPAIGNS[campaign]
    return sweeps.get(preset, sweeps["default"])


RETAIN_MARGIN = 0.05
"""A run qualifies as 'best' only if its accuracy on every retain task is within this of the
target's accuracy on that task."""


@dataclass
class DemoConfig:
    """Options of `unlearn demo`."""

    preset: str = "small"
    """Mini world preset: small (the default world's facts on a narrower model, built in about
    half the time), default (the research world of docs/results) or tiny (the tests')."""
    seed: int = 0
    """Seed of the world (an integer >= 0)."""
    out: str = "out/demo"
    """Everything goes here: world/, runs/, store.sqlite, sweep.yaml, report.md, PNGs."""
    world: str | None = None
    """Use this existing world instead of OUT/world."""
    campaign: str = "seed"
    """seed (the three seed methods), baselines (grad_diff, npo, simnpo, rmu, rr) or tamper
    (repnoise, tar, rmu with a latent adversary, npo with a sharpness-aware step); give --world
    to reuse the seed campaign's world."""
    suite: str | None = None
    """The robustness suite run on each method's best run and on the references: quick (the
    default), standard or campaign (docs/robustness.md)."""
    workers: int | None = None
    """Sweep points run at once, each in its own process with the cores split between them;
    default: 2 on a machine with 2 or more cores (faster than 1 worker with 2 threads for these
    small models, README), else 1."""

    def __post_init__(self) -> None:
        get_preset(self.preset)
        check_seed(self.seed)  # before anything prints or builds
        if self.campaign not in CAMPAIGNS:
            raise UsageError(f"--campaign must be one of {', '.join(CAMPAIGNS)}")
        if self.suite is not None and self.suite not in SUITES:
            raise UsageError(f"--suite must be one of {', '.join(SUITES)}, got {self.suite!r}")
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {self.workers}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn demo", description=__doc__)
    parser.add_arguments(DemoConfig, dest="cfg")
    cfg: DemoConfig = parser.parse_args(argv).cfg

    t0 = time.time()
    out = check_writable_parent(Path(cfg.out) / "x").parent  # creates nothing yet
    check_store(out / "store.sqlite")
    world_dir = Path(cfg.world) if cfg.world else out / "world"
    if (world_dir / "world.json").exists():
        world = load_world(world_dir)
        if cfg.world is None and (world.preset, world.seed) != (cfg.preset, cfg.seed):
            raise UsageError(
                f"{world_dir} holds a {world.preset} world (seed {world.seed}); "
                "use another --out or delete it"
            )
        print_err(f"[demo] reusing world {world_dir}")
    elif cfg.world:
        world = load_world(world_dir)  # raises the usual one-line error
    else:
        print_err(f"[demo] building the {cfg.preset} mini world in {world_dir}")
        world = build_world(cfg.preset, cfg.seed, world_dir)
    preset = world.preset
    runs, store_path = out / "runs", out / "store.sqlite"

    print_err("[demo] baselines")
    baseline_runs(world, runs, store_path, print_err)

    print_err("[demo] unlearning sweeps, then the robustness suite on the best run of each method")
    sweeps = campaign_sweeps(cfg.campaign, preset)
    spec = write_spec(out / "sweep.yaml", world.root, sweeps, f"demo-{cfg.campaign}")
    sweep = load_sweep(spec)
    workers = cfg.workers or (2 if available_cores() >= 2 else 1)
    # Every point of the demo's sweep has the world's default suite, so the same retain tasks.
    tasks = sweep.points[0].retain_tasks if sweep.points else ()
    floors = retain_floors(runs / "baseline-target", tasks, RETAIN_MARGIN)
    suite = SUITES[cfg.suite] if cfg.suite else DEMO_SUITES.get(preset, SUITES["quick"])
    inputs = suite_inputs(suite, world, progress=False)
    original = final_acc(runs / "baseline-target", inputs.heldout)
    with WorkerPool(workers, print_err) as pool:
        campaign = CampaignRobustness(
            pool, world, runs, store_path, inputs, original, sweep.points, floors, print_err
        )
        # The reference models' suites need no sweep result: they fill idle workers.
        campaign.attack("target", str(world.target), "baseline-target", "target", True)
        campaign.attack("filtered", str(world.filtered), "baseline-filtered", "filtered", True)
        try:
            states = run_sweep(
                sweep, WorkerPoolExecutor(workers, print_err, pool), print_err, campaign.point_done
            )
        except SweepPreempted as e:  # a signal: runs in progress checkpointed; rerun resumes
            print_err(f"[demo] stopped: {e}; run the same command again to resume")
            return EXIT_PREEMPTED
        for state in states:  # methods whose points all finished in an earlier demo
            campaign.point_done(None, state)
        pool.wait(campaign.jobs, campaign.ended)
        if pool.signum is not None:
            print_err("[demo] stopped by a signal; run the same command again to resume")
            return EXIT_PREEMPTED

    # The terminal gets a summary; the whole report (every run, every setting) is report.md.
    best_ids = campaign.best_ids()
    with Store(store_path) as store:
        render_report(store, out)
        text = summary(store, out, best_ids)
    print(text.rsplit("\n", 1)[0])
    print(f"({time.time() - t0:.0f} s)")
    print(text.rsplit("\n", 1)[1])
    return 0
