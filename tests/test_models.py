"""Models by --model: local dirs of two families, revisions, dtype, remote code, offline errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from unlearn.errors import UsageError
from unlearn.hooks import forward_hiddens, get_blocks
from unlearn.models import eval_mode, load_model, load_tokenizer, model_num_layers, resolve_model


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_both_families_load_through_the_model_path(tiny_hf_models, family):
    ref = resolve_model(str(tiny_hf_models[family]))
    model, tok = load_model(ref), load_tokenizer(ref)
    expected_blocks = model.gpt_neox.layers if family == "gpt_neox" else model.model.layers
    assert get_blocks(model) is expected_blocks
    assert model_num_layers(ref) == 3 == len(expected_blocks)
    ids = torch.tensor([tok.encode("The river flows past the old mill.")])
    # Layer l is block l's output: the last block's output normed is what the unembedding reads.
    hiddens = forward_hiddens(model, ids, torch.ones_like(ids), [0, 2])
    assert hiddens[0].shape == (1, ids.shape[1], 32)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    torch.testing.assert_close(hiddens[0], out.hidden_states[1])
    assert not model.training and ref.trust_remote_code is False


def test_dtype_option_sets_the_parameter_dtype(tiny_hf_models):
    ref = resolve_model(str(tiny_hf_models["llama"]))
    assert next(load_model(ref, "bfloat16").parameters()).dtype == torch.bfloat16
    with pytest.raises(UsageError, match="unknown dtype 'int3'"):
        load_model(ref, "int3")


def test_trust_remote_code_reaches_config_tokenizer_and_weights(tiny_hf_models, monkeypatch):
    import transformers

    seen = []
    for cls in (
        transformers.AutoConfig,
        transformers.AutoTokenizer,
        transformers.AutoModelForCausalLM,
    ):
        original = cls.from_pretrained

        def record(*args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code"), kwargs.get("revision")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    ref = resolve_model(str(tiny_hf_models["gpt_neox"]), trust_remote_code=True)
    model_num_layers(ref)
    load_tokenizer(ref)
    load_model(ref)
    assert {name for name, *_ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(trust is True for _, trust, _ in seen), seen


def test_relative_model_path_falls_back_to_the_world_dir(tiny_hf_models, tmp_path, monkeypatch):
    # world.json paths are relative to the world (jq -r .target gives "models/target"); a
    # three-part path is used here because "models/target" alone also reads as a hub id.
    world = tmp_path / "w"
    (world / "models" / "llama").mkdir(parents=True)
    (world / "models" / "llama" / "target").symlink_to(tiny_hf_models["llama"])
    monkeypatch.chdir(tmp_path)  # the relative path does not exist here
    ref = resolve_model("models/llama/target", world_dir=world)
    assert ref.name == str((world / "models" / "llama" / "target").absolute())
    with pytest.raises(UsageError, match="not found"):
        resolve_model("models/llama/target")


def test_bad_local_models_are_one_line_usage_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no config\.json"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(UsageError, match="neither a local directory nor a hub id"):
        resolve_model("no/such/dir")


def test_revision_with_a_local_directory_is_refused(tiny_hf_models, tmp_path, capsys):
    """A local directory holds one version; a revision would be ignored without a word (and
    recorded in the run's config as if it had been used)."""
    from unlearn.cli import main

    model = str(tiny_hf_models["gpt_neox"])
    with pytest.raises(UsageError, match="revision 'global_step100' given for the local model"):
        resolve_model(model, "global_step100")
    assert resolve_model(model).revision is None
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"text": "hello"}) + "\n")
    args = ["fit-lens", "--model", model, "--revision", "main", "--texts", str(texts)]
    assert main([*args, "--out", str(tmp_path / "lens")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "revision 'main'" in err[0], err
    assert not (tmp_path / "lens").exists()


def _cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # an empty cache: nothing is available offline
    return subprocess.run(
        [sys.executable, "-m", "unlearn", *args], env=env, capture_output=True, text=True
    )


def test_offline_unknown_hub_model_is_one_line_exit_2(tmp_path):
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"text": "hello"}) + "\n")
    args = ["fit-lens", "--model", "nobody/made-up-model", "--texts", str(texts)]
    proc = _cli([*args, "--out", str(tmp_path / "lens")], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/made-up-model" in lines[0], proc.stderr
    assert "pass a local directory" in lines[0]


def test_few_step_run_on_llama_with_local_corpora(tiny_hf_models, tmp_path, capsys):
    """`unlearn run` without a world: a Llama model, JSONL forget and parquet retain corpora."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unlearn.cli import main
    from unlearn.runs.rundir import RunDir

    forget = tmp_path / "forget.jsonl"
    forget.write_text(
        "".join(
            json.dumps({"title": f"T{i}", "abstract": "Zargreisovir spreads.", "text": "Rest."})
            + "\n"
            for i in range(6)
        )
    )
    retain = tmp_path / "retain.parquet"
    pq.write_table(pa.table({"text": [f"The river flows {i}." for i in range(6)]}), retain)
    out = tmp_path / "run"
    argv = ["run", "--method", "sequential", "--model", str(tiny_hf_models["llama"])]
    argv += ["--forget_corpus", str(forget), "--retain_corpus", str(retain), "--out", str(out)]
    argv += ["--max_steps", "2", "--num_train_examples", "4", "--pdbs", "2", "--grad_accum", "1"]
    argv += ["--max_length", "16", "--num_phases", "1", "--progress", "false"]
    # The evaluation suite without a world: a local WMDP-format (letter) question file.
    questions = tmp_path / "bio.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question": f"Where does strain {i} spread?",
                        "choices": ["air", "water", "soil", "food"], "answer": i % 4}) + "\n"
            for i in range(8)
        )
    )  # fmt: skip
    assert main([*argv, "--forget_tasks", str(questions)]) == 0
    record = RunDir(out).read()
    # A random model answers one letter to nearly every question: flagged, still a result.
    assert record.meta.status in ("done", "collapsed")
    assert record.meta.config["forget_corpus"] == str(forget)
    assert record.meta.config["suite"] == {"forget": ["bio"], "retain": [], "other": []}
    assert (out / "model" / "config.json").is_file()
    acc = [e for e in record.evals if e.task == "bio" and e.metric == "acc"]
    assert len(acc) == 1 and 0 <= acc[0].value <= 1
    capsys.readouterr()


def test_check_lora_targets_reads_module_names_without_weights(tiny_hf_models, monkeypatch):
    from unlearn import models

    neox = resolve_model(tiny_hf_models["gpt_neox"])
    llama = resolve_model(tiny_hf_models["llama"])
    # Names as peft matches them: a module's last name or a dotted suffix; all-linear alone.
    models.check_lora_targets(neox, ["query_key_value", "attention.dense", "dense_4h_to_h"])
    models.check_lora_targets(llama, ["q_proj", "v_proj", "mlp.down_proj"])
    models.check_lora_targets(llama, ["all-linear"])
    monkeypatch.setattr(models, "load_model", None)  # no weights may load for the check
    bad = [
        (neox, ["query_key_value", "q_proj"], r"no module named 'q_proj' \(modules LoRA"),
        (llama, ["input_layernorm"], "LlamaRMSNorm modules, which LoRA cannot adapt"),
        (neox, ["all-linear", "dense"], "cannot be combined"),
        (neox, [], "empty"),
    ]
    for ref, modules, message in bad:
        with pytest.raises(UsageError, match=message) as e:
            models.check_lora_targets(ref, modules)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["run", "attack"])
def test_bad_lora_target_is_one_line_before_the_run_dir_exists(
    tiny_world, tmp_path, capsys, command
):
    from unlearn.cli import main

    out = tmp_path / "out"
    argv = [command, "--world", str(tiny_world.root), "--out", str(out), "--lora", "true"]
    if command == "attack":
        argv += ["--model", str(tiny_world.target)]
    argv += ["--lora_target_modules", "query_key_value", "qkv_proj"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "no module named 'qkv_proj'" in err and "\n" not in err
    assert not out.exists()


def test_eval_mode_turns_dropout_off_and_restores_the_mode_it_found():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    with eval_mode(model) as inside:
        assert inside is model and not model.training and not model[1].training
    assert model.training and model[1].training  # back to training, submodules too
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("a failed evaluation")
    assert model.training  # restored on the way out of an exception
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training  # an evaluating model stays in eval mode
