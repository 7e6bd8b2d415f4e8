"""Models by --model: local dirs of two families, revisions, dtype, remote code, offline errors;
the reference model's switches (eval mode, adapters off) and what they leave as they found it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tiny_models import lora_copy, tiny_gpt_neox
from unlearn.config.settings import LoraSettings
from unlearn.errors import UsageError
from unlearn.models.load import load_model, load_tokenizer
from unlearn.models.lora import attach_lora
from unlearn.models.modes import adapters_disabled, eval_mode
from unlearn.models.refs import model_num_layers, resolve_model
from unlearn.readouts.hooks import forward_hiddens, get_blocks


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


def _damage(model_dir, how: str) -> str:
    """Damage a copy of a model directory; returns what the one-line error must contain."""
    weights, config_file = model_dir / "model.safetensors", model_dir / "config.json"
    config = json.loads(config_file.read_text())
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
        return f"{weights} is truncated"
    if how == "longer":
        weights.write_bytes(weights.read_bytes() + b"\0" * 16)
        return f"{weights} is longer than its header says"
    if how == "header_cut":
        weights.write_bytes(weights.read_bytes()[:20])
        return f"{weights} is not a whole safetensors file"
    if how == "index_shard_missing":
        index = {"metadata": {}, "weight_map": {"w": "model-00002-of-00002.safetensors"}}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
        return "names model-00002-of-00002.safetensors, which is not in"
    if how == "not_json":
        config_file.write_text("{not json")
        return f"{config_file} is not a readable JSON config"
    # hidden_size -5: transformers' own check fails on it (heads do not divide it); -8 passes
    # that check and would fail inside the weight load; "32": a string.
    value = {"hidden_size_-5": -5, "hidden_size_-8": -8, "hidden_size_str": "32"}[how]
    config_file.write_text(json.dumps({**config, "hidden_size": value}))
    return f"{config_file}: hidden_size must be an integer >= 1, got {value!r}"


DAMAGES = ["truncated", "longer", "header_cut", "index_shard_missing", "not_json",
           "hidden_size_-5", "hidden_size_-8", "hidden_size_str"]  # fmt: skip


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_model_dir_is_one_line_before_weights_load(
    tiny_hf_models, tmp_path, how, capsys, monkeypatch
):
    import shutil

    from unlearn.cli import main

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_hf_models["gpt_neox"], model_dir)
    expected = _damage(model_dir, how)
    with pytest.raises(UsageError) as caught:
        resolve_model(model_dir)
    assert expected in str(caught.value)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"text": "hello"}) + "\n")
    args = ["fit-lens", "--model", str(model_dir), "--texts", str(texts)]
    assert main([*args, "--out", str(tmp_path / "lens")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "lens").exists()


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
    import transformers

    from unlearn.models import lora

    neox = resolve_model(tiny_hf_models["gpt_neox"])
    llama = resolve_model(tiny_hf_models["llama"])
    # Names as peft matches them: a module's last name or a dotted suffix; all-linear alone.
    lora.check_lora_targets(neox, ["query_key_value", "attention.dense", "dense_4h_to_h"])
    lora.check_lora_targets(llama, ["q_proj", "v_proj", "mlp.down_proj"])
    lora.check_lora_targets(llama, ["all-linear"])
    # No weights may load for the check.
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", None)
    bad = [
        (neox, ["query_key_value", "q_proj"], r"no module named 'q_proj' \(modules LoRA"),
        (llama, ["input_layernorm"], "LlamaRMSNorm modules, which LoRA cannot adapt"),
        (neox, ["all-linear", "dense"], "cannot be combined"),
        (neox, [], "empty"),
    ]
    for ref, modules, message in bad:
        with pytest.raises(UsageError, match=message) as e:
            lora.check_lora_targets(ref, modules)
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


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_eval_mode_restores_each_modules_own_mode():
    model = tiny_gpt_neox(2).train()
    model.gpt_neox.layers[0].eval()  # a part kept in eval mode inside a training model
    before = _flags(model)
    with eval_mode(model):
        assert not any(_flags(model))
    assert _flags(model) == before
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("a failed evaluation")
    assert _flags(model) == before


def test_eval_mode_of_a_lora_model_sets_flags_without_train(monkeypatch):
    """The fast path: no module of an HF model with LoRA needs train() (its recursion is what
    eval_mode avoids), so a train() that fails is never called."""
    model = attach_lora(tiny_gpt_neox(2), LoraSettings(lora_r=2)).train()

    def no_train(self, mode=True):
        raise AssertionError("train() called")

    monkeypatch.setattr(nn.Module, "train", no_train)
    with eval_mode(model):
        assert not any(_flags(model))
    assert all(_flags(model))


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_a_loaded_model_keeps_its_own_layers_and_the_fast_eval_mode(
    tiny_hf_models, family, monkeypatch
):
    """A model loaded from a directory has no hub kernels (transformers 5 turns them on when the
    `kernels` package is installed, and then re-selects them on every train()/eval()), so
    eval_mode flips flags without calling train()."""
    model = load_model(resolve_model(str(tiny_hf_models[family])))
    assert not getattr(model, "use_kernels", False)
    model = attach_lora(model, LoraSettings(lora_r=2)).train()

    def no_train(self, mode=True):
        raise AssertionError("train() called")

    monkeypatch.setattr(nn.Module, "train", no_train)
    with eval_mode(model):
        assert not any(_flags(model))
    assert all(_flags(model))


class _TrainSideEffect(nn.Linear):
    """A module whose train() does more than set flags (as DoRA's clears a cache)."""

    def train(self, mode: bool = True) -> _TrainSideEffect:
        self.switches = getattr(self, "switches", 0) + 1
        return super().train(mode)


def test_eval_mode_goes_through_train_for_a_module_that_overrides_it():
    model = nn.Sequential(nn.Linear(2, 2), _TrainSideEffect(2, 2), nn.Dropout(0.5))
    model[2].eval()
    before = _flags(model)
    with eval_mode(model):
        assert not any(_flags(model)) and model[1].switches == 1
    assert model[1].switches == 2 and _flags(model) == before


def _lora_pair() -> tuple[nn.Module, nn.Module]:
    """(base model, a LoRA-wrapped copy whose adapters change its outputs)."""
    base = tiny_gpt_neox(3, initializer_range=0.2)
    return base, lora_copy(base, r=2, seed=1)


def test_adapters_disabled_computes_the_base_model_and_enables_them_again():
    base, model = _lora_pair()
    ids = torch.randint(64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with adapters_disabled(model) as inside:
            assert inside is model
            disabled = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
        with model.disable_adapter():
            peft_disabled = model(input_ids=ids).logits
        expected = base(input_ids=ids).logits
    assert not torch.allclose(adapted, expected, atol=1e-3)  # the adapters do something
    torch.testing.assert_close(disabled, expected)
    torch.testing.assert_close(disabled, peft_disabled, rtol=0, atol=0)
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)


def test_adapters_disabled_leaves_requires_grad_and_layer_states_as_found():
    from peft.tuners.tuners_utils import BaseTunerLayer

    _, model = _lora_pair()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    layers[0].enable_adapters(False)  # one layer already off (and its adapter frozen by peft)
    for name, p in model.named_parameters():
        if "layers.1." in name and "lora_A" in name:
            p.requires_grad_(False)  # an adapter frozen by hand
    grads = {name: p.requires_grad for name, p in model.named_parameters()}

    def state() -> list:
        own = [vars(m).get("_disable_adapters", "class default") for m in layers]
        return [*own, vars(model).get("_adapters_disabled")]

    before = state()
    assert before[0] is True and before[1] is False and grads != dict.fromkeys(grads, False)
    with adapters_disabled(model):
        assert all(m.disable_adapters for m in layers) and model._adapters_disabled
        assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    assert state() == before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("a failed forward")
    assert state() == before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
