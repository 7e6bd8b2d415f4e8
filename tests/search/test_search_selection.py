"""Choosing on one part of the questions, reporting on the other: every run evaluates each task's
selection and report parts, the best trial is chosen on the selection part and reported on the
report part (both labelled), the constraint's floor is compared with a tolerance, and a search
whose trials unlearned nothing names no best trial."""

from __future__ import annotations

import yaml
from helpers import REPORT_SHIFT, keys, patch_runs, spec, write

import unlearn.sweep.execute as execute
from unlearn.commands.search import main
from unlearn.runs.rows import RunMeta, utc_now
from unlearn.runs.rundir import RunDir
from unlearn.search.outputs import collect
from unlearn.search.spec import load_search
from unlearn.search.study import open_study


def test_the_best_is_chosen_on_selection_and_reported_on_report(tiny_world, tmp_path, monkeypatch):
    patch_runs(monkeypatch, [])
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=6, sampler="random"))
    assert main([str(path)]) == 0
    search = load_search(path)
    result = collect(search, open_study(search, create=False))
    best = result.best
    # Every run scored both parts of every forget and retain task, as separate tasks.
    evals = {e.task for e in RunDir(search.trials_dir / best.run_id).read().evals}
    assert {"forget#select", "forget#report", "retain#select", "retain#report"} <= evals
    # Chosen on the selection part (the stand-ins add REPORT_SHIFT on the report part).
    feasible = [t for t in result.trials if t.feasible]
    assert best.forget == min(t.forget for t in feasible)
    assert abs(best.report.forget - (best.forget + REPORT_SHIFT)) < 1e-9
    text = (search.out / "search.md").read_text()
    report_forget = f"{100 * best.report.forget:.2f}%"
    assert f"on the report questions forget {report_forget}" in text
    assert f"chosen on the selection questions forget {100 * best.forget:.2f}%" in text
    chosen = text.split("## Chosen trials on the report questions")[1].split("##")[0]
    assert f"| #{best.number} |" in chosen and report_forget in chosen
    assert "| Target (to unlearn) |  | 91.00% |" in chosen  # the target's report numbers
    assert "## All trials (selection questions)" in text
    header = (search.out / "best.yaml").read_text()
    assert f"# report questions: forget {report_forget}" in header
    assert f"# selection questions (chosen on): forget {100 * best.forget:.2f}%" in header
    config = yaml.safe_load(header)  # a replay scores whole tasks: the spec's own suite
    assert "forget_tasks" not in config and "retain_tasks" not in config


def _stand_ins(monkeypatch, target: dict[str, float], trial: dict[str, float]) -> None:
    """Baselines and runs whose accuracies are `target` / `trial` (task -> acc, both parts)."""

    def write_evals(run_dir, suite, accs, step):
        for key in keys(suite, "forget") + keys(suite, "retain"):
            task = key.split("#")[0]  # forget_heldout scores as forget
            run_dir.append_eval(step, key, {"acc": accs.get(task, accs["forget"])})

    def baseline(label, model_args, suite_args, out, role=None, *args, run_id=None, **kw):
        run_dir = RunDir(out)
        run_dir.write_run(RunMeta(run_id or "b", "baseline", config={"role": role},
                                  status="running"))  # fmt: skip
        write_evals(run_dir, suite_args, target, 0)
        return run_dir.update(status="done", finished=utc_now())

    def run(cfg, monitor=None):
        run_dir = RunDir(cfg.args.out)
        run_dir.write_run(RunMeta(cfg.args.run_id, "unlearn", "sequential", status="running"))
        write_evals(run_dir, cfg.args.suite, trial, 2)
        return run_dir.update(status="done", finished=utc_now())

    monkeypatch.setattr(execute, "run_baseline", baseline)
    monkeypatch.setattr(execute, "run_unlearning", run)


def test_a_search_that_unlearned_nothing_names_no_best(tiny_world, tmp_path, monkeypatch, capsys):
    # Runs too short to change the model: every trial scores what the target scores.
    accs = {"forget": 0.875, "retain": 0.96, "retain_late": 0.96, "near_domain": 0.96}
    _stand_ins(monkeypatch, accs, accs)
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=4, sampler="random"))
    assert main([str(path)]) == 1
    search = load_search(path)
    assert collect(search, open_study(search, create=False)).best is None
    text = (search.out / "search.md").read_text()
    assert "No trial unlearned anything" in text and "Trial #" not in text
    assert "87.50% on the selection questions" in text
    assert not (search.out / "best.yaml").exists()
    assert "No trial unlearned anything" in capsys.readouterr().out


def test_a_retain_accuracy_on_its_floor_satisfies_the_constraint(tiny_world, tmp_path, monkeypatch):
    # 0.7 against 0.8 - 0.1, which floats compute as 0.7000000000000001: on the floor.
    target = {"forget": 0.9, "retain": 0.8, "retain_late": 0.8, "near_domain": 0.8}
    trial = {"forget": 0.5, "retain": 0.7, "retain_late": 0.8, "near_domain": 0.8}
    _stand_ins(monkeypatch, target, trial)
    path = write(tmp_path, spec(tiny_world, tmp_path, budget=1, delta=0.1))
    assert main([str(path)]) == 0
    search = load_search(path)
    best = collect(search, open_study(search, create=False)).best
    assert best is not None and best.margin < 0 and best.feasible  # -1e-16: within tolerance
