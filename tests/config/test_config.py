"""config.py: the ModelArgs section and the one builder from flat names (routing, coercion,
unknown fields, bad types), and the flat names it keeps for run, attack, eval and fit-lens."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from unlearn.commands.arguments import ArgumentParser
from unlearn.config.settings import (
    LoraSettings,
    ModelArgs,
    TrainConfig,
    build_sections,
    coerce_values,
)
from unlearn.errors import UsageError
from unlearn.recipes.attack import AttackArgs, build_attack_config
from unlearn.recipes.unlearning import RunArgs, build_run_config

RUN_SECTIONS = (RunArgs, TrainConfig, LoraSettings)


def test_build_sections_routes_flat_names_into_nested_sections_and_coerces():
    values = {"out": "o", "world": "w", "model": "m", "revision": "r", "lr": 1, "lora_r": 8}
    built = build_sections(RUN_SECTIONS, values)
    args, train, lora = built[RunArgs], built[TrainConfig], built[LoraSettings]
    assert args.model_args == ModelArgs("m", "r", False)  # nested: routed by its flat names
    assert (args.out, args.world) == ("o", "w")
    assert train.lr == 1.0 and isinstance(train.lr, float)  # an int for a float field
    assert lora.lora_r == 8 and train.pdbs == TrainConfig().pdbs  # the rest keep defaults


def test_coercion_keeps_types_and_turns_paths_into_strings(tmp_path):
    typed = coerce_values(
        RUN_SECTIONS,
        {"out": tmp_path, "max_steps": None, "text_fields": ["text"], "grad_clip": 0},
    )
    assert typed == {"out": str(tmp_path), "max_steps": None, "text_fields": ["text"],
                     "grad_clip": 0.0}  # fmt: skip
    assert isinstance(typed["grad_clip"], float)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lrr": 1e-3, "out": "o"}, "unknown run config field(s): lrr"),
        ({"lr": "1e-3"}, "where: lr must be a number, got '1e-3'"),
        ({"max_steps": 2.5}, "where: max_steps must be an integer, got 2.5"),
        ({"pdbs": True}, "where: pdbs must be an integer, got True"),
        ({"lora": "yes"}, "where: lora must be true or false, got 'yes'"),
        ({"model": 3}, "where: model must be a string, got 3"),
        ({"text_fields": "text"}, "where: text_fields must be a list, got 'text'"),
        ({"lora_target_modules": [1]}, "where: lora_target_modules must be a string, got 1"),
    ],
)
def test_bad_names_and_types_are_one_line_usage_errors(values, message):
    with pytest.raises(UsageError) as e:
        build_sections(RUN_SECTIONS, {"out": "o", "world": "w", **values}, "run config", "where")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_flat_name_owned_by_two_sections_is_refused():
    @dataclass
    class Twice:
        model: str | None = None

    with pytest.raises(TypeError, match="model is in both ModelArgs and Twice"):
        build_sections((RunArgs, Twice), {})


def test_run_and_attack_builders_share_the_builder():
    run = build_run_config("lens", {"out": "o", "world": "w", "model": "m", "lr": 1})
    assert run.args.model_args.model == "m" and run.train.lr == 1.0
    with pytest.raises(UsageError, match="unknown lens config field"):
        build_run_config("lens", {"out": "o", "world": "w", "lrr": 1})
    attack = build_attack_config({"model": "m", "out": "o", "world": "w", "revision": "r"})
    assert attack.args.model_args == ModelArgs("m", "r") and attack.lora.lora is False
    with pytest.raises(UsageError, match="eval_every must be an integer"):
        build_attack_config({"model": "m", "out": "o", "world": "w", "eval_every": "5"})


# The flat config dicts of runs made before ModelArgs existed: resume and sweeps compare them.
RUN_KEYS = [
    "method", "retain_coef", "remove_coef", "retain_ramp_start", "forget_end_fraction",
    "retain_loss", "forget_loss", "layers", "retain_layers", "layer_stride", "start_layer",
    "num_phases", "lr", "optimizer", "muon_lr", "adam_lr", "weight_decay", "num_train_examples",
    "pdbs", "grad_accum", "epochs", "max_steps", "warmup", "lr_decay", "max_length", "grad_clip",
    "seed", "dtype", "mixed_precision", "gradient_checkpointing", "diverge_factor", "log_every",
    "checkpoint_every", "distributed", "collective_timeout", "lora", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "merge", "model", "revision", "world", "retain_mix",
    "mix_fraction",
]  # fmt: skip
"""(muon_lr and adam_lr came later; None in them equals a missing key when a resume compares;
so do mixed_precision and gradient_checkpointing at their defaults: config.ADDED_FIELDS.)"""
ATTACK_KEYS = [
    "lr", "optimizer", "muon_lr", "adam_lr", "weight_decay", "num_train_examples", "pdbs",
    "grad_accum", "epochs", "max_steps", "warmup", "lr_decay", "max_length", "grad_clip", "seed",
    "dtype", "mixed_precision", "gradient_checkpointing", "diverge_factor", "log_every",
    "checkpoint_every", "distributed", "collective_timeout", "lora", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "merge", "model", "corpus", "eval_every",
]  # fmt: skip


def test_config_dicts_keep_their_flat_names():
    run = build_run_config(
        "sequential",
        {"world": "w", "out": "o", "model": "m", "revision": "r", "retain_mix": "x",
         "mix_fraction": 0.5},
    ).to_dict()  # fmt: skip
    assert list(run) == RUN_KEYS
    assert (run["model"], run["revision"], run["world"]) == ("m", "r", "w")
    attack = build_attack_config({"model": "m", "out": "o", "world": "w"}).to_dict()
    assert list(attack) == ATTACK_KEYS and attack["model"] == "m"


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        ("unlearn.commands.run", ["--world", "w", "--out", "o"]),
        ("unlearn.commands.attack", ["--world", "w", "--out", "o"]),
        ("unlearn.commands.eval", ["--world", "w"]),
        ("unlearn.commands.fit_lens", ["--world", "w", "--out", "o"]),
    ],
)
def test_model_flags_keep_their_names_on_every_command(command, extra, monkeypatch):
    """--model/--revision/--trust_remote_code parse into the ModelArgs section, unchanged."""
    import importlib

    seen = {}

    def parse_args(self, argv):
        ns = original(self, argv)
        seen["ns"] = ns
        raise SystemExit(0)

    original = ArgumentParser.parse_args
    monkeypatch.setattr(ArgumentParser, "parse_args", parse_args)
    argv = ["--model", "m", "--revision", "r", "--trust_remote_code", "true", *extra]
    with pytest.raises(SystemExit):
        importlib.import_module(command).main(argv)
    ns = seen["ns"]
    section = ns.args if hasattr(ns, "args") else ns.cfg
    assert section.model_args == ModelArgs("m", "r", True)


def test_model_args_resolve_world_relative_paths_and_defaults(tiny_hf_models):
    root = tiny_hf_models["gpt_neox"].parent
    world = SimpleNamespace(root=root)
    ref = ModelArgs("gpt_neox").resolve(world)  # relative: not here, but inside the world dir
    assert ref.name == str(root / "gpt_neox")
    assert ModelArgs().resolve(world, default=tiny_hf_models["llama"]).name == str(
        tiny_hf_models["llama"]
    )
    with pytest.raises(UsageError, match="--model is required"):
        ModelArgs().resolve(None)
    with pytest.raises(UsageError, match="revision 'r' given for the local model directory"):
        ModelArgs("gpt_neox", "r").resolve(world)


def test_attack_args_need_a_model():
    args = AttackArgs(model_args=ModelArgs("m", "r", True), out="o", world="w")
    assert args.model_args == ModelArgs("m", "r", True)
    with pytest.raises(UsageError, match="--model is required"):
        AttackArgs(out="o", world="w")


SEED_COMMANDS = {
    "run": ["run", "--method", "sequential"],
    "attack": ["attack", "--model", "m"],
    "robustness": ["robustness", "--model", "m"],
    "world": ["world", "build", "--preset", "tiny"],
    "demo": ["demo", "--preset", "tiny"],
}


@pytest.mark.parametrize("command", SEED_COMMANDS)
def test_a_negative_seed_is_refused_everywhere_the_same_way(command, tmp_path, capsys):
    """One rule (an integer >= 0) in every command that takes a seed, checked before anything
    is printed, built or created."""
    from unlearn.cli import main

    argv = [*SEED_COMMANDS[command], "--out", str(tmp_path / "out"), "--seed", "-1"]
    if command in ("run", "attack", "robustness"):
        argv += ["--world", str(tmp_path / "w")]  # never read: the seed is refused first
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"unlearn {command}: error: --seed must be an integer >= 0, got -1"], err
    assert list(tmp_path.iterdir()) == []


def test_a_seed_from_a_spec_or_config_file_follows_the_same_rule():
    with pytest.raises(UsageError, match=r"--seed must be an integer >= 0, got -3"):
        build_sections((TrainConfig,), {"seed": -3})
    assert build_sections((TrainConfig,), {"seed": 0})[TrainConfig].seed == 0


# -- settings a method does not read, in specs ---------------------------------------------------

TINY_RUN = {"num_train_examples": 8, "pdbs": 2, "grad_accum": 1, "max_steps": 2, "progress": False}
RR_CHOICE = {"forget_end_fraction": {"choice": [0.75, 1.0]}}
"""Its first choice is rr's default: the trial built at the other end is the one refused."""
IGNORED_IN_SPECS = {
    "sweep grid": (
        "sweep",
        {"method": "grad_diff", "grid": {"forget_loss": ["random_ce", "max_entropy"]}},
        "grad_diff does not use --forget_loss",
    ),
    "sweep base": (
        "sweep",
        {"method": "npo", "base": {**TINY_RUN, "layers": [1]}, "grid": {"retain_coef": [1, 5]}},
        "npo does not use --layers",
    ),
    "search range": (
        "search",
        {"method": "rr", "space": {"retain_ramp_start": {"float": [0, 0.5]}}},
        "rr does not use --retain_ramp_start",
    ),
    "search choice": (
        "search",
        {"goal": "pareto", "space": {"retain_coef": {"float": [1, 20]}},
         "methods": [{"method": "sequential"}, {"method": "rr", "space": RR_CHOICE}]},
        "rr does not use --forget_end_fraction (got 1.0)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(IGNORED_IN_SPECS))
def test_specs_refuse_a_setting_the_method_ignores(tiny_world, tmp_path, capsys, case):
    """A sweep whose points, or a search whose space, vary a setting the method never reads
    would train the same model under several names: the spec is refused before anything runs."""
    import yaml

    from unlearn.cli import main

    command, change, needle = IGNORED_IN_SPECS[case]
    spec = {"name": "s", "world": str(tiny_world.root), "out": str(tmp_path / "out"),
            "base": dict(TINY_RUN), **change}  # fmt: skip
    if command == "search":
        spec = {"goal": "boundary", "budget": 4, **spec}
        spec["pruner"] = "none" if spec["goal"] == "boundary" else None
        spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_from_before_the_added_fields_compares_equal():
    from unlearn.training.checkpointer import _comparable

    now = build_run_config("npo", {"world": "w", "out": "o"}).to_dict()
    before = {
        k: v for k, v in now.items() if k not in ("mixed_precision", "gradient_checkpointing")
    }
    assert _comparable(before) == _comparable(now)
    assert _comparable({**before, "mixed_precision": "bf16"}) != _comparable(now)
