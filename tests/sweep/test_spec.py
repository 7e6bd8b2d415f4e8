"""Sweep specs: validation before anything is written, grid expansion and point ids, the point
cap, the slurm: block."""

from __future__ import annotations

import pickle

import pytest

from unlearn import cli
from unlearn.errors import UsageError
from unlearn.sweep import spec as spec_mod
from unlearn.sweep.spec import MAX_POINTS, load_sweep

from .helpers import TINY, base_spec, write_spec

# -- validation ---------------------------------------------------------------------------------


BAD_SPECS = [
    ({"eval": {"forget_tasks": ["no_such_task_anywhere"]}}, "unknown task(s)"),
    ({"eval": {"forget_tasks": ["forget@0"]}}, "the limit after @ must be >= 1"),
    ({"eval": {"retain_tasks": ["retain"]}}, "no forget task"),
    ({"eval": {"forget_taks": ["forget"]}}, "eval: unknown key(s) forget_taks"),
    ({"eval": {"forget_tasks": ["missing.jsonl"]}}, "missing.jsonl not found"),
    ({"baselines": {"T": {"revision": "x"}}}, "model (a directory or hub id) is required"),
    ({"baselines": {"T": {"model": "m", "colour": 1}}}, "unknown key(s) colour"),
    ({"grdi": {"lr": [1]}}, "unknown key(s) grdi"),
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"base": {**TINY, "retain_coeff": 1}}, "retain_coeff"),
    ({"attack": {"lrr": 1}}, "unknown attack config field(s): lrr"),
    ({"grid": {"lr": [1e-3, -1]}}, "--lr must be > 0"),
    ({"base": {**TINY, "max_steps": 2.5}}, "max_steps must be an integer"),
    ({"base": {**TINY, "out": "x"}}, "out set by the sweep"),
    ({"grid": {"lr": 0.001}}, "grid.lr must be a non-empty list"),
    ({"base": {**TINY, "layers": [99]}}, "--layers [99] outside"),
    ({"base": {**TINY, "lora": True, "merge": False}, "attack": {}}, "needs the merged model"),
    ({"sweeps": [{"method": "lens"}]}, "go inside its blocks"),
    ({"grid": {"retain_coef": [5, 5.0]}}, "have the same configuration"),
    ({"base": {**TINY, "lora": True, "lora_target_modules": ["qkv"]}}, "no module named 'qkv'"),
    ({"attack": {"lora": True, "lora_target_modules": ["dense", "x"]}}, "no module named 'x'"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SPECS)
def test_bad_spec_is_rejected_before_anything_is_written(tiny_world, tmp_path, change, message):
    spec = write_spec(tmp_path, {**base_spec(tiny_world), **change})
    with pytest.raises(UsageError) as e:
        load_sweep(spec)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s").exists()


def test_without_a_world_the_model_and_corpora_are_required(tiny_world, tmp_path):
    spec = base_spec(tiny_world)
    del spec["world"]
    with pytest.raises(UsageError, match="give --model, --forget_corpus and --retain_corpus"):
        load_sweep(write_spec(tmp_path, spec))
    assert not (tmp_path / "s").exists()
    (tmp_path / "notaworld").mkdir()
    with pytest.raises(UsageError, match="not a world directory"):
        load_sweep(write_spec(tmp_path, {**spec, "world": "notaworld"}))  # relative to the spec


def test_duplicate_yaml_keys_are_an_error(tiny_world, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"world: {tiny_world.root}\nmethod: sequential\nbase: {{lr: 1.0e-3, lr: 1.0e-2}}\n"
    )
    with pytest.raises(UsageError, match="duplicate key"):
        load_sweep(spec)


def test_cli_bad_spec_exits_2_with_one_line(tiny_world, tmp_path, capsys):
    spec = write_spec(tmp_path, {**base_spec(tiny_world), "method": "nope"})
    assert cli.main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unlearn sweep: error:") and "unknown method" in err
    assert "\n" not in err
    assert cli.main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert not (tmp_path / "s").exists()


# -- expansion and ids --------------------------------------------------------------------------


def test_grid_expansion_and_deterministic_ids(tiny_world, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: g\nworld: {tiny_world.root}\n"
        "base: {num_train_examples: 8, lr: 1e-3}\n"  # 1e-3 is a float here, not YAML 1.1's str
        "sweeps:\n"
        "  - method: sequential\n"
        "    grid: {retain_coef: [1, 5], remove_coef: [5, 20, 30]}\n"
        "  - method: checkpoint_transfer\n"
        "    points: [{retain_coef: 2, remove_coef: 5}, {retain_coef: 20, remove_coef: 5}]\n"
        "    grid: {max_steps: [2]}\n"
    )
    sweep = load_sweep(spec)
    ids = [p.id for p in sweep.points]
    assert len(ids) == 2 * 3 + 2 and len(set(ids)) == len(ids)
    assert ids[0].startswith("sequential-rc1-rm5-") and ids[5].startswith("sequential-rc5-rm30-")
    assert ids[6].startswith("checkpoint_transfer-rc2-rm5-steps2-")
    assert all(len(i.rsplit("-", 1)[1]) == 6 for i in ids)
    assert sweep.points[0].run_config.train.lr == 1e-3
    assert sweep.points[1].run_config.method.remove_coef == 20.0
    assert sweep.out == tmp_path / "g" and sweep.store == tmp_path / "g" / "store.sqlite"
    assert sweep.points[0].run_dir == tmp_path / "g" / ids[0]
    assert [p.id for p in load_sweep(spec).points] == ids  # same spec, same ids

    # 5 and 5.0 are one configuration; a different base value is another one.
    spec.write_text(spec.read_text().replace("[5, 20, 30]", "[5.0, 20, 30]"))
    assert [p.id for p in load_sweep(spec).points] == ids
    spec.write_text(spec.read_text().replace("lr: 1e-3", "lr: 2e-3"))
    changed = [p.id for p in load_sweep(spec).points]
    assert changed[0] != ids[0] and changed[0].rsplit("-", 1)[0] == ids[0].rsplit("-", 1)[0]


def test_attack_points_at_the_run_model(tiny_world, tmp_path):
    sweep = load_sweep(write_spec(tmp_path, base_spec(tiny_world, attack={"max_steps": 3})))
    p = sweep.points[0]
    assert p.attack_dir == sweep.out / f"{p.id}-attack"
    assert p.attack_config.args.parent == p.id
    assert p.attack_config.args.model_args.model == str(p.run_dir / "model")
    assert p.attack_config.train.max_steps == 3
    copy = pickle.loads(pickle.dumps(p))  # what a cluster executor ships to a job
    assert copy.run_config == p.run_config and copy.attack_config == p.attack_config


def test_points_are_counted_before_they_are_built(tiny_world, tmp_path, monkeypatch, capsys):
    built = []
    real_point = spec_mod.build_point

    def counted(*args):
        built.append(1)
        assert len(built) <= 10, "the grid is being expanded"
        return real_point(*args)

    monkeypatch.setattr(spec_mod, "build_point", counted)
    huge = {f: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] for f in ("retain_coef", "remove_coef", "lr")}
    huge |= {"seed": list(range(10_000))}  # 10^7 points
    spec = write_spec(tmp_path, base_spec(tiny_world, grid=huge))
    assert cli.main(["sweep", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "10,000,000 points" in err and "--max_points" in err and "\n" not in err
    assert built == [] and not (tmp_path / "s").exists()

    # The cap is a default, not a wall: --max_points moves it (both ways).
    spec = write_spec(tmp_path, base_spec(tiny_world, grid={"retain_coef": [1, 2, 3]}))
    assert cli.main(["sweep", str(spec), "--dry-run", "--max_points", "2"]) == 2
    assert "3 points" in capsys.readouterr().err
    assert cli.main(["sweep", str(spec), "--dry-run", "--max_points", "3"]) == 0
    assert len(load_sweep(spec, max_points=3).points) == 3
    assert MAX_POINTS == 1000  # the CLI's default repeats it (docs/sweeps.md too)
    assert cli.main(["sweep", str(spec), "--max_points", "0"]) == 2
    assert "--max_points must be >= 1" in capsys.readouterr().err


# -- the slurm: block ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slurm", "message"),
    [
        ({"partiton": "gpu"}, "slurm: unknown key(s) partiton"),
        ({"time": 0}, "slurm: time must be an integer >= 1, got 0"),
        ({"gpus_per_node": "4"}, "gpus_per_node must be an integer"),
        ({"sbatch": ["--account=x"]}, "sbatch must be a mapping"),
        ({"setup": "module load cuda"}, "setup must be a list"),
        ("gpu", "slurm: must be a mapping"),
    ],
)
def test_bad_slurm_block_is_one_line_exit_2(tiny_world, tmp_path, capsys, slurm, message):
    spec = write_spec(tmp_path, base_spec(tiny_world, slurm=slurm))
    assert cli.main(["sweep", str(spec), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "s").exists()  # nothing ran or was written


def test_sweep_spec_rejects_slurm_keys_before_writing(tiny_world, tmp_path):
    with pytest.raises(UsageError, match="unknown key"):
        load_sweep(write_spec(tmp_path, base_spec(tiny_world, slurm={"gpus": 1})))
