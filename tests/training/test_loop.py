"""The training loop: LoRA leaves the base untouched, full fine-tuning moves only trainable
weights, accumulation is invariant, the guards fire, and the plan reports epochs."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from tiny_models import tiny_gpt_neox
from unlearn.config.settings import LoraSettings, TrainConfig
from unlearn.data.batching import ExampleStream
from unlearn.errors import DivergedError, RetainZeroError
from unlearn.methods.base import Phase, Reference
from unlearn.methods.sequential import Sequential, SequentialConfig
from unlearn.models.lora import attach_lora
from unlearn.training.loop import make_plan, train

VOCAB = 64


def tiny_model(seed: int = 0) -> GPTNeoXForCausalLM:
    return tiny_gpt_neox(4, VOCAB, seed).train()


def streams(n: int = 16, length: int = 12, pdbs: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    forget = [torch.randint(0, VOCAB, (length,), generator=g).tolist() for _ in range(n)]
    retain = [torch.randint(0, VOCAB, (length,), generator=g).tolist() for _ in range(n)]
    return ExampleStream(forget, pdbs, 0, seed), ExampleStream(retain, pdbs, 0, seed + 1)


def sequential(model, retain_loss: str = "l2", forget_loss: str = "random_ce") -> Sequential:
    method = Sequential(
        SequentialConfig(retain_loss=retain_loss, forget_loss=forget_loss, layers=[2])
    )
    method.setup(model, env=None)  # sequential needs nothing from the environment
    return method


def run(model, method, reference, cfg: TrainConfig, n: int = 16, **kw):
    forget, retain = streams(n=n, pdbs=cfg.pdbs)
    plan = make_plan(cfg, n, method.phases)
    return train(model, method, reference, forget, retain, cfg, plan, progress=False, **kw)


def test_lora_changes_adapters_and_leaves_every_base_weight_identical():
    model = attach_lora(tiny_model(), LoraSettings(lora_r=4, lora_dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(lr=1e-2, num_train_examples=16, pdbs=2, grad_accum=2, max_steps=3)
    run(model, sequential(model), Reference(model), cfg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora_names = {n for n in before if "lora_" in n}
    assert changed, "nothing trained"
    assert changed <= lora_names, f"base weights changed: {sorted(changed - lora_names)[:3]}"
    # lora_A starts random and lora_B at zero; both must have moved.
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)


def test_full_finetuning_changes_only_trainable_params():
    model = tiny_model()
    ref = Reference(model, frozen_copy=copy.deepcopy(model))
    model.gpt_neox.embed_in.requires_grad_(False)  # a frozen part must stay bit-identical
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in ref.copy.named_parameters()}
    cfg = TrainConfig(lr=1e-3, num_train_examples=16, pdbs=2, grad_accum=1, max_steps=2)
    run(model, sequential(model), ref, cfg)
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        assert torch.equal(p, before[name]), name
    assert not torch.equal(
        model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight,
        before["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"],
    )
    for name, p in ref.copy.named_parameters():
        assert torch.equal(p, ref_before[name]), f"reference moved: {name}"


def test_gradient_accumulation_2x2_equals_4x1():
    """Same global batch: 2 micro-batches of 2 == 1 micro-batch of 4 (equal lengths, no padding).

    max_entropy is the noise-free forget loss; random targets are drawn per micro-batch."""
    results = []
    for pdbs, accum in ((2, 2), (4, 1)):
        model = tiny_model()
        ref = Reference(model, frozen_copy=copy.deepcopy(model))
        cfg = TrainConfig(
            lr=1e-3, num_train_examples=16, pdbs=pdbs, grad_accum=accum, max_steps=2, grad_clip=0.0
        )
        logged = []
        method = sequential(model, forget_loss="max_entropy")
        run(model, method, ref, cfg, on_log=lambda s, v, logged=logged: logged.append(v))
        results.append((logged, [p.detach().clone() for p in model.parameters()]))
    (log_a, params_a), (log_b, params_b) = results
    for a, b in zip(log_a, log_b, strict=True):
        assert a["forget"] == pytest.approx(b["forget"], rel=1e-4)
        assert a["retain"] == pytest.approx(b["retain"], rel=1e-3, abs=1e-6)
    # Adam normalises each update to ~lr (1e-3), so compare weights at a small fraction of it.
    for pa, pb in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=2e-5)


def test_plan_reports_steps_and_epochs_and_warns(capsys):
    cfg = TrainConfig(num_train_examples=1024, pdbs=4, grad_accum=2, epochs=1)
    plan = make_plan(cfg, 1024, lambda steps: [Phase("main", steps)], world_size=4)
    assert (
        plan.total_steps == 32 and plan.effective_batch == 32
    )  # the reference campaign's 1024 -> 32 steps
    assert plan.epochs == pytest.approx(1.0)
    model = tiny_model()
    cfg = TrainConfig(lr=1e-3, num_train_examples=8, pdbs=2, grad_accum=2, epochs=3)
    run(model, sequential(model), Reference(model, copy.deepcopy(model)), cfg, n=8)
    err = capsys.readouterr().err
    assert "optimizer steps: 6" in err and "effective epochs: 3.00" in err
    assert "warning: 3.00 effective epochs" in err


class _ExplodingObjective:
    phase = None

    def __init__(self, model):
        self.model = model

    def loss(self, ctx):
        out = self.model(input_ids=ctx.forget.input_ids).logits.mean()
        scale = 1.0 if ctx.step == 0 else 1e6
        return {"forget": out * 0 + scale + out * 1e-6}

    def weights(self, step, total):
        return {"forget": 1.0}

    def phases(self, steps):
        return [Phase("main", steps)]


def test_exploding_loss_raises_diverged():
    model = tiny_model()
    cfg = TrainConfig(lr=1e-3, num_train_examples=8, pdbs=2, grad_accum=1, max_steps=4)
    with pytest.raises(DivergedError, match="exploded"):
        run(model, _ExplodingObjective(model), None, cfg, n=8)


def test_retain_term_stuck_at_zero_is_an_error():
    """The reference campaign's bug: the 'reference' is the trained model itself, so KL is always
    exactly 0."""
    model = tiny_model()
    broken = Reference(model, frozen_copy=model)  # the reference IS the trained model
    broken.copy.requires_grad_(True)
    cfg = TrainConfig(lr=1e-3, num_train_examples=16, pdbs=2, grad_accum=1, max_steps=6)
    with pytest.raises(RetainZeroError):
        run(model, sequential(model, retain_loss="kl"), broken, cfg)


def test_schedules_reach_the_trainer():
    model = tiny_model()
    cfg = TrainConfig(lr=1e-3, num_train_examples=16, pdbs=2, grad_accum=1, max_steps=3)
    logged = []
    run(
        model,
        sequential(model),
        Reference(model, copy.deepcopy(model)),
        cfg,
        on_log=lambda s, v: logged.append(v),
    )
    # Defaults: retain ramps 0.25 -> 1 x 5, forget decays 1 -> 0.75 x 5, over optimizer steps.
    assert [round(v["coef_retain"], 4) for v in logged] == [1.25, 3.125, 5.0]
    assert [round(v["coef_forget"], 4) for v in logged] == [5.0, 4.375, 3.75]


def test_plan_counts_the_epochs_of_every_phase(capsys):
    """Sequential draws steps x effective batch examples in *each* phase from one stream, so 7
    phases of one epoch each are 7 epochs of data (the reference campaign's 7 x 128 steps over
    1,024)."""
    cfg = TrainConfig(num_train_examples=1024, pdbs=4, grad_accum=2, epochs=1)
    phases = lambda steps: [Phase(f"layer {i}", steps, i) for i in range(7)]  # noqa: E731
    plan = make_plan(cfg, 1024, phases, world_size=4)
    assert plan.total_steps == 7 * 32
    assert plan.epochs == pytest.approx(7.0)
    assert "effective epochs: 7.00" in plan.describe(cfg)
    # One epoch per phase over two phases: the loop warns that examples repeat.
    model = tiny_model()
    method = Sequential(SequentialConfig(layers=[2, 1]))
    method.setup(model, env=None)
    cfg = TrainConfig(lr=1e-3, num_train_examples=8, pdbs=2, grad_accum=2, epochs=1)
    run(model, method, Reference(model, copy.deepcopy(model)), cfg, n=8)
    err = capsys.readouterr().err
    assert "optimizer steps: 4 (2 phase(s) x 2)" in err and "effective epochs: 2.00" in err
    assert "warning: 2.00 effective epochs" in err
