"""Each method end to end on the tiny world, and the cost rules: frozen work once per batch."""

from __future__ import annotations

import json

import pytest
import torch

from unlearn.cli import main as cli
from unlearn.fsutil import read_jsonl
from unlearn.methods.registry import method_names

FAST = ["--max_steps", "2", "--pdbs", "2", "--grad_accum", "1", "--num_train_examples", "8",
        "--progress", "false"]  # fmt: skip


@pytest.mark.parametrize("method", method_names())
def test_cli_run_each_method(tiny_world, tmp_path, method):
    out = tmp_path / method
    rc = cli(["run", "--method", method, "--world", str(tiny_world.root), "--out", str(out), *FAST])
    assert rc == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] in ("done", "collapsed") and meta["method"] == method
    assert set(meta["final"]) >= {"forget", "retain", "loss"}
    assert all(isinstance(v, float) for v in meta["final"].values())
    tasks = {r["task"] for r in read_jsonl(out / "evals.jsonl") if r["metric"] == "acc"}
    assert tasks == set(tiny_world.questions)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")  # merged, loadable
    assert model.config.num_hidden_layers == tiny_world.stats["preset_settings"]["layers"]
    # LoRA runs also keep the adapter; checkpoint transfer defaults to full fine-tuning.
    assert (out / "adapter" / "adapter_config.json").exists() == meta["config"]["lora"]
    steps = {r["step"] for r in read_jsonl(out / "metrics.jsonl")}
    phases = len(meta["config"]["layers"]) if method == "sequential" else 1  # 2 steps per phase
    assert steps == set(range(1, 2 * phases + 1))


def test_full_finetuning_run_saves_a_plain_model(tiny_world, tmp_path):
    out = tmp_path / "full"
    rc = cli(["run", "--method", "sequential", "--world", str(tiny_world.root), "--out", str(out),
              "--lora", "false", "--lr", "1e-4", *FAST])  # fmt: skip
    assert rc == 0
    assert (out / "model" / "config.json").exists() and not (out / "adapter").exists()


def test_frozen_work_is_done_once_per_micro_batch(tiny_world, tmp_path):
    """Source activations and reference outputs: one forward each per micro-batch, no more."""
    from unlearn.methods.base import Reference
    from unlearn.recipes.unlearning import build_run_config, prepare, validate
    from unlearn.training.loop import train

    cfg = build_run_config(
        "checkpoint_transfer",
        {"world": str(tiny_world.root), "out": str(tmp_path / "r"), "max_steps": 2,
         "grad_accum": 2, "pdbs": 2, "num_train_examples": 8, "progress": False},
    )  # fmt: skip
    p = prepare(cfg, validate(cfg), tmp_path / "r")
    calls = {"source": 0, "reference": 0}
    p.method.source.register_forward_pre_hook(
        lambda *a: calls.__setitem__("source", calls["source"] + 1)
    )
    original = Reference.forward

    def counting(self, *args, **kwargs):
        calls["reference"] += 1
        return original(self, *args, **kwargs)

    Reference.forward = counting
    try:
        train(p.model, p.method, p.reference, p.forget, p.retain, cfg.train, p.plan,
              progress=False)  # fmt: skip
    finally:
        Reference.forward = original
    micro_batches = 2 * 2
    assert calls == {"source": micro_batches, "reference": micro_batches}


def test_lora_reference_is_the_adapter_disabled_model_not_a_copy(tiny_world, tmp_path):
    from unlearn.recipes.unlearning import build_run_config, prepare, validate

    cfg = build_run_config(
        "sequential",
        {"world": str(tiny_world.root), "out": str(tmp_path / "r"), "max_steps": 1,
         "lora": True, "progress": False},
    )  # fmt: skip
    p = prepare(cfg, validate(cfg), tmp_path / "r")
    assert p.reference.copy is None and p.reference.model is p.model
    batch = p.retain.batch(0)
    with torch.no_grad():
        for module in p.model.modules():  # make the adapter do something
            if hasattr(module, "lora_B"):
                for lin in module.lora_B.values():
                    lin.weight.fill_(0.5)
        ref = p.reference.forward(batch).logits
        with p.model.disable_adapter():
            base = p.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        cur = p.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(ref, base)
    assert not torch.allclose(ref, cur)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "invalid choice"),
        (["--layers", "99"], "outside the model's blocks"),
        (["--retain_coef", "-1"], "retain_coef must be >= 0"),
        (["--lr", "0"], "lr must be > 0"),
        (["--retain_loss", "huber"], "unknown retain_loss"),
        (
            ["--method", "rr", "--retain_ramp_start", "0.5"],
            "method rr does not use --retain_ramp_start (got 0.5)",
        ),
        (["--method", "rr", "--forget_end_fraction", "1"], "rr does not use --forget_end_fraction"),
        (
            ["--method", "grad_diff", "--forget_loss", "max_entropy"],
            "grad_diff does not use --forget_loss",
        ),
        (
            ["--method", "checkpoint_transfer", "--forget_loss", "max_entropy"],
            "checkpoint_transfer does not use --forget_loss",
        ),
        (["--method", "npo", "--layers", "1"], "method npo does not use --layers (got [1])"),
        (["--method", "simnpo", "--layers", "1", "2"], "simnpo does not use --layers"),
        (["--method", "grad_diff", "--layers", "2"], "grad_diff does not use --layers"),
        (["--method", "rmu", "--trained_params", "all"], "unknown trained_params 'all'"),
    ],
)
def test_bad_run_config_exits_2_before_loading(tiny_world, tmp_path, capsys, monkeypatch, args,
                                               message):  # fmt: skip
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before validation finished")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    out = tmp_path / "bad"
    rc = cli(["run", "--world", str(tiny_world.root), "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_missing_world_and_model_dir_that_is_not_a_model(tmp_path, capsys):
    rc = cli(["run", "--world", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert rc == 2
    (tmp_path / "notamodel").mkdir()
    rc = cli(["run", "--model", str(tmp_path / "notamodel"), "--forget_corpus", "f.jsonl",
              "--retain_corpus", "r.jsonl", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a model directory" in err[1]
    assert not (tmp_path / "o").exists()


# -- retain layers -------------------------------------------------------------------------------


def _retain_context(model, reference):
    from unlearn.data.batching import Batch
    from unlearn.methods.base import StepContext

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding, which must not count
    batch = Batch(ids, mask)
    return StepContext(model, reference, forget=batch, retain=batch, step=0, total_steps=1)


def _with_block_changed(model, block: int):
    """A frozen copy of `model` whose block `block` (only) differs: its outputs from that block
    up differ, those of the blocks below do not."""
    import copy

    from unlearn.readouts.hooks import get_blocks

    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in get_blocks(changed)[block].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return changed


def _hand_l2(model, reference, ctx, layers):
    """The L2 retain term from full forwards of both models, block outputs captured at `layers`
    (HF's last hidden state is after the final norm, so hidden_states[N] is not block N-1's)."""
    from unlearn.readouts.hooks import capture
    from unlearn.training import losses

    batch, hiddens = ctx.retain, []
    for m in (reference, model):
        with torch.no_grad(), capture(m, layers) as h:
            m(batch.input_ids, attention_mask=batch.attention_mask)
            hiddens.append([h[i] for i in layers])
    return losses.l2_retain(*hiddens, batch.mask)


def test_lens_l2_retain_covers_its_target_layers_and_sequential_every_block(tmp_path):
    """As in the reference campaign: the lens method's L2 retain term compares the target layers
    only, the sequential method's every block; `retain_layers` picks them explicitly."""
    from tiny_models import tiny_gpt_neox
    from unlearn.methods.base import MethodEnv, Reference
    from unlearn.methods.lens import LensConfig, LensUnlearning
    from unlearn.methods.sequential import Sequential, SequentialConfig
    from unlearn.readouts.lens_files import save_lens
    from unlearn.readouts.tuned_lens import TunedLens

    model = tiny_gpt_neox(4)
    save_lens(TunedLens.for_model(model), tmp_path / "lens", model_name="tiny")
    reference = _with_block_changed(model, 3)  # above the lens target layer 1
    ctx = _retain_context(model, Reference(model, reference))
    env = MethodEnv(model_name="tiny", tokenizer=None, device=torch.device("cpu"), dtype="float32")

    def lens(**kw) -> LensUnlearning:
        method = LensUnlearning(LensConfig(lens=str(tmp_path / "lens"), layers=[1], **kw))
        method.setup(model, env)
        return method

    default = lens()
    assert default.retain_layers == [1] and default.describe()["retain_layers"] == [1]
    with torch.no_grad():
        assert float(default.retain(ctx)) == 0.0  # block 3 changed, h_1 did not
        explicit = lens(retain_layers=[1, 3])
        assert float(explicit.retain(ctx)) == pytest.approx(
            float(_hand_l2(model, reference, ctx, [1, 3])), rel=1e-5
        )
        assert float(explicit.retain(ctx)) > 0.01
        sequential = Sequential(SequentialConfig(layers=[2]))
        sequential.setup(model, env)
        assert sequential.retain_layers == [0, 1, 2, 3]
        assert float(sequential.retain(ctx)) == pytest.approx(
            float(_hand_l2(model, reference, ctx, [0, 1, 2, 3])), rel=1e-5
        )


def test_retain_layers_are_validated():
    from unlearn.errors import UsageError
    from unlearn.methods.lens import LensConfig

    with pytest.raises(UsageError, match="duplicates"):
        LensConfig(retain_layers=[1, 1])
    with pytest.raises(UsageError, match="retain_loss l2"):
        LensConfig(retain_loss="kl", retain_layers=[1])
    with pytest.raises(UsageError, match=r"--retain_layers \[4\] outside the model's blocks 0..3"):
        LensConfig(retain_layers=[0, 4]).check_layers(4)
    LensConfig(retain_layers=[0, 3]).check_layers(4)


def test_bad_retain_layers_exit_2_before_loading(tiny_world, tmp_path, capsys):
    out = tmp_path / "bad"
    rc = cli(["run", "--world", str(tiny_world.root), "--out", str(out), "--retain_layers", "99"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--retain_layers [99] outside" in err and len(err.splitlines()) == 1
    assert not out.exists()


# -- settings a method does not read -----------------------------------------------------------


def _non_default(method: str, name: str) -> dict:
    """A valid value of the shared setting `name` that is not `method`'s default (plus what it
    needs: retain_layers goes with an l2 retain loss)."""
    from unlearn.methods import get_method

    default = get_method(method).config_cls().defaults()[name]
    values = {"retain_coef": 1.5, "remove_coef": 1.5, "retain_ramp_start": 0.5,
              "forget_end_fraction": 0.5, "forget_loss": "max_entropy", "layers": [1],
              "retain_loss": "ce" if default != "ce" else "kl"}  # fmt: skip
    if name == "retain_layers":
        return {"retain_loss": "l2", "retain_layers": [1]}
    assert values[name] != default
    return {name: values[name]}


@pytest.mark.parametrize("method", method_names())
def test_each_shared_setting_is_read_or_refused(method):
    """Every shared setting moved from its default: accepted if the method declares it reads
    it, else one line naming the method and the setting (so runs differing only there never
    train the same model under two names)."""
    from unlearn.errors import UsageError
    from unlearn.methods import get_method
    from unlearn.methods.base import SHARED_SETTINGS
    from unlearn.recipes.unlearning import build_run_config

    uses = get_method(method).uses
    for name in SHARED_SETTINGS:
        values = {"out": "o", "world": "w", **_non_default(method, name)}
        if name in uses:
            cfg = build_run_config(method, values)
            assert getattr(cfg.method, name) == values[name]
        else:
            with pytest.raises(UsageError) as e:
                build_run_config(method, values)
            assert f"method {method} does not use --{name}" in str(e.value)
            assert "\n" not in str(e.value)


def test_a_method_must_declare_the_settings_it_reads():
    from unlearn.methods import REGISTRY, register
    from unlearn.methods.base import Method, MethodConfig

    class Undeclared(Method):
        name = "undeclared"
        config_cls = MethodConfig

    class Unknown(Undeclared):
        uses = ("retain_coef", "lr")  # lr is not a method setting

    for cls in (Undeclared, Unknown):
        with pytest.raises(TypeError, match="must declare `uses`"):
            register(cls)
    assert "undeclared" not in REGISTRY


@pytest.mark.parametrize("method", method_names())
def test_declared_schedule_settings_are_the_ones_that_move_the_coefficients(method):
    """What a method declares about the coefficient schedule matches its `weights`: rr's own
    schedule ignores the ramps, every other method's follows them."""
    from unlearn.methods import get_method

    cls = get_method(method)

    def schedule(**kw) -> list[dict]:
        return [cls(cls.config_cls(**kw)).weights(step, 10) for step in range(10)]

    for name in ("retain_ramp_start", "forget_end_fraction"):
        moved = schedule(**_non_default(method, name)) != schedule()
        assert moved == (name in cls.uses), (method, name)


def test_describe_records_layers_only_where_the_method_reads_them():
    """run.json gets the resolved `layers` of a method that reads them, so a replay of a
    grad_diff run (which does not) is not refused for a setting it never gave."""
    from tiny_models import tiny_gpt_neox
    from unlearn.methods import get_method
    from unlearn.methods.base import Method
    from unlearn.recipes.unlearning import build_run_config

    model = tiny_gpt_neox(4)
    for method in ("grad_diff", "npo", "simnpo", "rr", "checkpoint_transfer"):
        cls = get_method(method)
        m = cls(cls.config_cls())
        Method.setup(m, model, None)  # depth and layers, as every method's setup starts
        described = m.describe()
        assert ("layers" in described) == ("layers" in cls.uses), method
        build_run_config(method, {"out": "o", "world": "w", **described})  # a replay's values


# -- which parameters RMU trains ---------------------------------------------------------------

RMU_PARAMS = {
    ("gpt_neox", "mlp_out"): ("dense_4h_to_h.weight", "dense_4h_to_h.bias"),
    ("gpt_neox", "mlp"): ("dense_h_to_4h.weight", "dense_h_to_4h.bias", "dense_4h_to_h.weight",
                          "dense_4h_to_h.bias"),
    ("llama", "mlp_out"): ("down_proj.weight",),
    ("llama", "mlp"): ("gate_proj.weight", "up_proj.weight", "down_proj.weight"),
}  # fmt: skip
"""Per family and --trained_params: the parameters of each trained block's MLP that train
(mlp_out, the default: the WMDP reference code's down projection only)."""


@pytest.mark.parametrize(("family", "params"), sorted(RMU_PARAMS))
@pytest.mark.parametrize("lora", [False, True])
def test_rmu_trains_the_mlp_output_projection_or_the_whole_mlp(family, params, lora):
    from tiny_models import lora_copy, tiny_gpt_neox, tiny_llama
    from unlearn.methods.rmu import RMU, RMUConfig

    base = (tiny_gpt_neox if family == "gpt_neox" else tiny_llama)(5)
    model = lora_copy(base, 2, seed=0) if lora else base
    kwargs = {} if params == "mlp_out" else {"trained_params": params}
    rmu = RMU(RMUConfig(layers=[3], **kwargs))
    rmu.setup(model, type("Env", (), {"device": torch.device("cpu")})())
    assert rmu.trained == [1, 2, 3]
    prefix = "gpt_neox" if family == "gpt_neox" else "model"
    wanted = {f"{prefix}.layers.{i}.mlp.{p}" for i in (1, 2, 3) for p in RMU_PARAMS[family, params]}
    trained = {
        name for name, p in model.named_parameters() if p.requires_grad and rmu.trainable(name)
    }
    if lora:  # the adapters of those modules: lora_A and lora_B of each wrapped weight
        wanted = {w.rsplit(".", 1)[0] + f".{ab}.default.weight" for w in wanted
                  if w.endswith(".weight") for ab in ("lora_A", "lora_B")}  # fmt: skip
        trained = {n.removeprefix("base_model.model.") for n in trained}
    assert trained == wanted


def test_rmu_refuses_a_model_without_those_modules_before_its_weights_load(tmp_path):
    """OPT's MLP is `fc1`/`fc2` directly in the block, no `mlp` module: nothing would train."""
    from transformers import OPTConfig

    from unlearn.errors import UsageError
    from unlearn.methods.rmu import RMUConfig
    from unlearn.models.refs import ModelRef

    config = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, ffn_dim=32,
                       num_attention_heads=2, word_embed_proj_dim=16)  # fmt: skip
    config.save_pretrained(tmp_path / "opt")  # a config, no weights: none are read
    ref = ModelRef(str(tmp_path / "opt"))
    with pytest.raises(UsageError, match=r"no MLP output projection .*--trained_params mlp"):
        RMUConfig().check_inputs(ref, 3)
    with pytest.raises(UsageError, match="no mlp or feed_forward module"):
        RMUConfig(trained_params="mlp").check_inputs(ref, 3)


# -- lists of method names come from the registry -----------------------------------------------


def test_run_help_and_the_methods_page_list_every_registered_method(capsys):
    from pathlib import Path

    from unlearn.methods.registry import settings_table

    with pytest.raises(SystemExit) as e:
        cli(["run", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help text wraps lines
    assert f"Unlearning method: {', '.join(method_names())}." in text
    page = (Path(__file__).parents[2] / "docs" / "methods.md").read_text()
    assert settings_table() in page  # regenerate it from the registry when a method changes
    assert all(f"| `{name}` |" in page for name in method_names())
