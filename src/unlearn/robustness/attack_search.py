"""Attack search: the most damaging fine-tuning attack a budget of trials finds on one model.

A fixed grid of attacks (the suites' `attacks`) tells how a model holds up against the attacks
someone chose in advance; an adversary tunes theirs. Following TamperBench's protocol, a suite
with `attack_budget: N` (`unlearn robustness --suite searched`, or `--attack_budget N` with any
suite; `attack_space:` in a suite file bounds it) runs an Optuna study per model over the
fine-tuning attack's

- learning rate (log-uniform over `AttackSpace.lr`),
- length in optimizer steps (`AttackSpace.steps`),
- adapter: full fine-tuning or LoRA of a rank in `AttackSpace.lora_ranks`,
- data: forget-domain documents or benign text,

and keeps the configuration whose constrained worst case (the highest held-out forget accuracy
at a step where every retain task is within the suite's utility margin of its value before the
attack: `score.attack_row`) is highest. The grid's own fine-tuning attacks, which ran first, are
told to the study as finished trials: the sampler (TPE, seeded) starts from what the grid found
instead of rediscovering it, and the search's result is the best over the grid and its N new
trials, so it is never below the grid's. Each new trial is an ordinary attack run under
OUT/attacks/search-NN/ and is reused when the suite is run again (the same seed and the same
results replay the same suggestions), so a killed search loses only the trial in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from unlearn.robustness.score import SEARCH_FAMILY, START_NAME, trial_name
from unlearn.robustness.suite import AttackSpace, FinetuneAttack


def attack_of(params: dict[str, Any], name: str, space: AttackSpace) -> FinetuneAttack:
    """The attack a trial's parameters describe."""
    rank = int(params["rank"])
    return FinetuneAttack(
        data=params["data"], lr=float(params["lr"]), lora=rank > 0, lora_r=rank or 16,
        steps=int(params["steps"]), eval_every=min(space.eval_every, int(params["steps"])),
        name=name,
    )  # fmt: skip


def params_of(attack: FinetuneAttack) -> dict[str, Any]:
    """A grid attack as the search's parameters (its rank 0 when it is full fine-tuning)."""
    return {"lr": attack.lr, "steps": attack.steps, "rank": attack.lora_r if attack.lora else 0,
            "data": attack.data}  # fmt: skip


def _distributions(space: AttackSpace, known: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The space as Optuna distributions, widened to hold the grid's own values (a grid attack
    with 200 steps is still a point the sampler may learn from)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    lrs = [p["lr"] for p in known]
    steps = sorted({*space.steps, *(p["steps"] for p in known)})
    ranks = sorted({*space.lora_ranks, *(p["rank"] for p in known)})
    data = list(dict.fromkeys([*space.data, *(p["data"] for p in known)]))
    return {
        "lr": FloatDistribution(min([space.lr[0], *lrs]), max([space.lr[1], *lrs]), log=True),
        "steps": CategoricalDistribution(steps),
        "rank": CategoricalDistribution(ranks),
        "data": CategoricalDistribution(data),
    }


def search_attacks(
    budget: int,
    seed: int,
    space: AttackSpace,
    grid: Sequence[tuple[FinetuneAttack, float | None]],
    run_trial: Callable[[FinetuneAttack], dict[str, Any]],
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run `budget` new trials; returns their attack rows (`run_trial`'s, in order).

    `grid` holds the suite's fine-tuning attacks that already ran, each with its worst case
    (None: no result, not told to the study). `run_trial(attack)` runs one attack and returns
    its row (`score.attack_row`); a row without a worst case (failed, or no step kept the
    retain tasks) scores as 0 for the sampler: an attack that breaks the model is no threat.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    known = [(params_of(a), value) for a, value in grid if value is not None]
    distributions = _distributions(space, [p for p, _ in known])
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, budget // 3))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for params, value in known:
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=distributions, value=value)
        )
    rows = []
    for number in range(budget):
        trial = study.ask()
        rank_choices = distributions["rank"].choices
        params = {
            "lr": trial.suggest_float("lr", *_bounds(distributions["lr"]), log=True),
            "steps": trial.suggest_categorical("steps", distributions["steps"].choices),
            "rank": trial.suggest_categorical("rank", rank_choices),
            "data": trial.suggest_categorical("data", distributions["data"].choices),
        }
        attack = attack_of(params, trial_name(number), space)
        row = run_trial(attack)
        value = row.get("worst_case")
        study.tell(trial, 0.0 if value is None else float(value))
        if log is not None:
            shown = "no counting step" if value is None else f"{100 * value:.2f}%"
            log(f"attack search {attack.name}: {_describe(attack)} -> {shown}")
        rows.append({**row, "search_params": params})
    return rows


def _bounds(distribution: Any) -> tuple[float, float]:
    return distribution.low, distribution.high


def _describe(attack: FinetuneAttack) -> str:
    mode = f"LoRA r{attack.lora_r}" if attack.lora else "full"
    return f"{attack.data}, {mode}, lr {attack.lr:.2g}, {attack.steps} steps"


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the highest worst case (ties: the earlier), None if none has one."""
    scored = [r for r in rows if r.get("worst_case") is not None]
    return max(scored, key=lambda r: r["worst_case"]) if scored else None


def searched_rows(
    grid: Sequence[FinetuneAttack],
    grid_rows: Sequence[dict[str, Any]],
    budget: int,
    seed: int,
    run_attack_row: Callable[[FinetuneAttack], dict[str, Any]],
    space: AttackSpace,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """The rows of the `finetune-searched` family: the grid's most damaging attack (its row
    again, named `search-start`: reused, not rerun) and the search's `budget` new trials. The
    family's worst case is the best of them, so the search never reports less than the grid
    it started from, and says which attack reached it."""
    pairs = [(a, r.get("worst_case")) for a, r in zip(grid, grid_rows, strict=True)]

    def run_trial(attack: FinetuneAttack) -> dict[str, Any]:
        return {**run_attack_row(attack), "family": SEARCH_FAMILY}

    rows = search_attacks(budget, seed, space, pairs, run_trial, log)
    start = best_row(grid_rows)
    if start is None:
        return rows
    return [{**start, "name": START_NAME, "family": SEARCH_FAMILY, "reused_from": start["name"]},
            *rows]  # fmt: skip
