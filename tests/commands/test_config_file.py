"""`--config FILE` of `unlearn run` and `unlearn attack` (unlearn.config.files): a run.json replays
its run bit for bit, flags override a YAML file, bad files are one line before anything loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unlearn.cli import main as cli
from unlearn.commands.attack import parse as parse_attack
from unlearn.commands.run import parse as parse_run
from unlearn.errors import UsageError
from unlearn.fsutil import read_jsonl
from unlearn.methods import REGISTRY
from unlearn.recipes.attack import build_attack_config
from unlearn.recipes.unlearning import build_run_config
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RunDir

TINY = ["--max_steps", "2", "--pdbs", "2", "--grad_accum", "1", "--num_train_examples", "8",
        "--eval", "false", "--progress", "false"]  # fmt: skip


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def _config(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["config"]


def test_run_json_replays_the_run_bit_for_bit(tiny_world, tmp_path):
    """rmu: its run.json holds the resolved layers, retain_layers and trained_layers that
    `describe()` adds; the replay takes them as given (the same model)."""
    first, again = tmp_path / "first", tmp_path / "again"
    argv = ["run", "--method", "rmu", "--world", str(tiny_world.root), "--out", str(first), *TINY]
    assert cli(argv) == 0
    assert {"trained_layers", "retain_layers", "layers"} <= set(_config(first))
    # A run directory stands for its run.json; --eval and --progress are not in run.json.
    argv = ["run", "--config", str(first), "--out", str(again), "--eval", "false",
            "--progress", "false"]  # fmt: skip
    assert cli(argv) == 0
    meta = json.loads((again / "run.json").read_text())
    assert meta["method"] == "rmu" and meta["id"] == "again" and meta["status"] == "done"
    assert _config(again) == _config(first)
    a, b = _weights(first), _weights(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The comparison can fail: the same replay with another learning rate trains other weights.
    other = tmp_path / "other"
    assert cli([*argv[:4], str(other), *argv[5:], "--lr", "2e-3"]) == 0
    c = _weights(other)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_yaml_config_with_a_flag_that_overrides_it(tiny_world, tmp_path):
    """Flags win over the file; relative paths resolve against the file's directory (the
    world's, and the out dir that the file names)."""
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    world = os.path.relpath(tiny_world.root, spec_dir)
    (spec_dir / "best.yaml").write_text(
        f"method: grad_diff\nworld: {world}\nout: r1\nlr: 3e-4\nretain_coef: 2\nmax_steps: 1\n"
        "pdbs: 2\ngrad_accum: 1\nnum_train_examples: 8\neval: false\nprogress: false\n"
    )
    argv = ["run", "--config", str(spec_dir / "best.yaml"), "--lr", "1e-4", "--remove_coef", "3"]
    assert cli(argv) == 0
    config = _config(spec_dir / "r1")
    assert config["method"] == "grad_diff" and config["world"] == str(spec_dir / world)
    assert config["lr"] == 1e-4 and config["remove_coef"] == 3.0  # the flags
    assert config["retain_coef"] == 2.0 and config["max_steps"] == 1  # the file


BAD = [
    ("missing.yaml", None, "not found"),
    ("bad.yaml", "lr: [1, 2\n", "invalid YAML"),
    ("list.yaml", "- lr: 1e-3\n", "a config file is a YAML mapping"),
    ("empty.yaml", "", "got an empty file"),
    ("typo.yaml", "retain_cof: 5\n", "unknown lens config field(s): retain_cof"),
    ("nested.yaml", "train:\n  lr: 1e-3\n", "unknown lens config field(s): train"),
    ("type.yaml", "lr: '1e-3'\n", "lr must be a number"),
    ("value.yaml", "lr: -1.0\n", "--lr must be > 0"),
    ("method.yaml", "method: nope\n", "unknown method 'nope'"),
    (
        "ignored.yaml",
        "method: rr\nretain_ramp_start: 0.5\n",
        "method rr does not use --retain_ramp_start (got 0.5)",
    ),
    ("ignored.json", "ignored", "method grad_diff does not use --layers (got [1, 2])"),
    ("missing.json", None, "not found"),
    ("attack.json", "attack", "is a run of kind 'attack'"),
    ("nodir", "dir", "is not a run directory"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_file_is_one_line_and_exit_2(
    tiny_world, tmp_path, capsys, monkeypatch, name, content, message
):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before validation finished")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    path = tmp_path / name
    if content == "attack":  # a run.json of another kind
        config = build_attack_config({"model": "m", "world": "w", "out": "o"}).to_dict()
        path.write_text(json.dumps(RunMeta("a1", "attack", config=config).to_dict()))
    elif content == "ignored":  # a run.json whose config sets what its method never reads
        config = build_run_config("grad_diff", {"world": "w", "out": "o"}).to_dict()
        meta = RunMeta("g1", "unlearn", "grad_diff", config={**config, "layers": [1, 2]})
        path.write_text(json.dumps(meta.to_dict()))
    elif content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    rc = cli(["run", "--config", str(path), "--world", str(tiny_world.root), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def _unlearn_run_json(tmp_path: Path, method: str, **fields) -> Path:
    """A finished run's run.json, as `run_unlearning` writes it (no training)."""
    values = {"world": "/w", "out": str(tmp_path / "orig"), "run_id": "orig", "store": "/s.db",
              **fields}  # fmt: skip
    config = {**build_run_config(method, values).to_dict(), "suite": {"forget": ["forget"]}}
    meta = RunMeta("orig", "unlearn", method=method, config=config, status="done")
    RunDir(tmp_path / "orig").write_run(meta)
    return tmp_path / "orig" / "run.json"


def test_run_json_method_out_and_informational_keys(tmp_path):
    """The file's method; its `suite` roles dropped (else an unknown field); no out/id/store."""
    path = _unlearn_run_json(tmp_path, "rmu", lr=2e-4, max_steps=3, steering_coef=7)
    cfg = parse_run(["--config", str(path), "--out", str(tmp_path / "new")])
    assert cfg.args.method == "rmu" and cfg.method.steering_coef == 7.0
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == 3
    # out, run_id and store are the original run's: a replay writes elsewhere.
    assert cfg.args.run_id is None and cfg.args.store is None
    with pytest.raises(UsageError, match="--out DIR is required"):
        parse_run(["--config", str(path)])
    with pytest.raises(UsageError, match="a replay is a new run"):
        parse_run(["--config", str(path), "--out", str(tmp_path / "orig")])
    # --method on the command line wins; the file's rmu-only fields are then unknown.
    with pytest.raises(UsageError, match="unknown grad_diff config field"):
        parse_run(["--config", str(path), "--out", str(tmp_path / "n"), "--method", "grad_diff"])


def test_no_config_parses_as_before():
    """Without --config the parsers give what the recipes' builders give from flat names."""
    for method in REGISTRY:
        argv = ["--world", "/w", "--out", "/o", "--method", method]
        assert parse_run(argv) == build_run_config(method, {"world": "/w", "out": "/o"})
    values = {"model": "m", "world": "/w", "out": "/o"}
    assert parse_attack(["--model", "m", "--world", "/w", "--out", "/o"]) == build_attack_config(
        values
    )


def test_attack_config_from_yaml(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "attack.yaml").write_text(
        "model: target\nworld: w\nout: a1\nmax_steps: null\nlr: 1e-4\nlora: true\nlora_r: 4\n"
        "eval_every: 5\nforget_tasks: [questions.jsonl]\n"
    )
    cfg = parse_attack(["--config", str(tmp_path / "attack.yaml"), "--lora_r", "8"])
    assert cfg.args.model_args.model == str(tmp_path / "target")  # exists next to the file
    assert cfg.args.world == str(tmp_path / "w") and cfg.args.out == str(tmp_path / "a1")
    assert cfg.args.suite.forget_tasks == [str(tmp_path / "questions.jsonl")]
    assert cfg.train.max_steps is None  # the file's null, not the attack's default 60
    assert cfg.train.lr == 1e-4 and cfg.train.pdbs == 16  # the file; the attack's default
    assert cfg.lora.lora and cfg.lora.lora_r == 8 and cfg.args.eval_every == 5  # flag wins
    (tmp_path / "typo.yaml").write_text("method: rmu\n")
    with pytest.raises(UsageError, match="unknown attack config field"):
        parse_attack(["--config", str(tmp_path / "typo.yaml")])


def test_attack_replays_from_its_run_dir(tiny_world, tmp_path):
    first, again = tmp_path / "a1", tmp_path / "a2"
    common = ["--world", str(tiny_world.root), "--progress", "false"]
    argv = ["attack", "--model", str(tiny_world.filtered), "--out", str(first), "--max_steps",
            "1", "--pdbs", "2", "--forget_tasks", "forget_heldout", *common]  # fmt: skip
    assert cli(argv) == 0
    assert cli(["attack", "--config", str(first), "--out", str(again), *common]) == 0
    assert _config(again) == _config(first)

    def curve(run_dir: Path) -> list[tuple]:
        return [(r["step"], r["task"], r["metric"], r["value"])
                for r in read_jsonl(run_dir / "evals.jsonl")]  # fmt: skip

    assert curve(again) == curve(first) and len(curve(first)) > 0
