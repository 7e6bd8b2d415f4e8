"""Activation checkpointing changes memory, never results: every method's loss terms and
gradients are the same with and without it, on GPT-NeoX and Llama, with LoRA and in full
fine-tuning; and a model that cannot checkpoint is refused before its weights load."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from tiny_methods import lens_method, transfer_method
from tiny_models import lora_copy, tiny_gpt_neox, tiny_llama
from unlearn.cli import main as cli
from unlearn.data.batching import collate
from unlearn.methods import REGISTRY
from unlearn.methods.base import Phase, Reference, StepContext
from unlearn.methods.checkpoint_transfer import CheckpointTransferConfig
from unlearn.methods.lens import LensConfig
from unlearn.methods.registry import method_names
from unlearn.models.gradient_checkpointing import enable_gradient_checkpointing
from unlearn.readouts.hooks import get_blocks

FAMILIES = {"gpt_neox": tiny_gpt_neox, "llama": tiny_llama}
COEFS = {"retain_coef": 2.0, "remove_coef": 1.0}


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return collate([torch.randint(1, 64, (n,), generator=g).tolist() for n in (9, 12, 6)], 0)


def _method(name: str, model, reference):
    if name == "lens":
        with reference.use() as original:
            return lens_method(model, original, LensConfig(**COEFS))
    if name == "checkpoint_transfer":
        return transfer_method(model, CheckpointTransferConfig(**COEFS))
    cls = REGISTRY[name]
    method = cls(cls.config_cls(**COEFS))
    method.setup(model, types.SimpleNamespace(device=torch.device("cpu")))
    return method


def _step(name: str, family: str, lora: bool, checkpointing: bool):
    """One micro-batch's loss terms and gradients, and how often block 0's MLP ran forward (a
    recomputed block runs its MLP again in the backward pass)."""
    base = FAMILIES[family](4, seed=0, initializer_range=0.2)
    if checkpointing:
        enable_gradient_checkpointing(base)
    if lora:
        model = lora_copy(base, r=4, seed=1)
        reference = Reference(model)
    else:
        model = base
        reference = Reference(model, frozen_copy=copy.deepcopy(model))
        model.requires_grad_(True)
    method = _method(name, model, reference)
    for param_name, p in model.named_parameters():
        if p.requires_grad and not method.trainable(param_name):
            p.requires_grad_(False)
    method.phase = Phase("unlearn", 4, method.layers[-1] if method.layers else None)
    calls = []
    get_blocks(model)[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    ctx = StepContext(
        model=model, reference=reference, forget=_batch(1), retain=_batch(2), step=1,
        total_steps=4, phase=0, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    weights = method.weights(1, 4)
    terms = method.loss(ctx)
    sum(weights.get(n, 0.0) * v for n, v in terms.items()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {n: v.item() for n, v in terms.items()}, grads, len(calls)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", method_names())
def test_checkpointing_keeps_every_methods_losses_and_gradients(name, family, lora):
    plain_terms, plain_grads, plain_calls = _step(name, family, lora, checkpointing=False)
    terms, grads, calls = _step(name, family, lora, checkpointing=True)
    assert calls > plain_calls  # the blocks really were recomputed in the backward pass
    assert terms.keys() == plain_terms.keys()
    for key, value in terms.items():
        assert value == pytest.approx(plain_terms[key], rel=1e-6, abs=1e-7), key
    assert grads.keys() == plain_grads.keys() and grads  # LoRA adapters get gradients too
    for key, g in grads.items():
        torch.testing.assert_close(g, plain_grads[key], rtol=1e-5, atol=1e-6, msg=key)
    if lora:
        assert any(float(g.abs().max()) > 0 for k, g in grads.items() if "lora_A" in k)


def test_a_model_that_cannot_checkpoint_is_refused_before_its_weights_load(
    tiny_world, tmp_path, monkeypatch, capsys
):
    import transformers
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXPreTrainedModel

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the check")

    monkeypatch.setattr(GPTNeoXPreTrainedModel, "supports_gradient_checkpointing", False)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    out = tmp_path / "r"
    for argv in (
        ["run", "--method", "npo", "--world", str(tiny_world.root)],
        ["attack", "--model", str(tiny_world.target), "--world", str(tiny_world.root)],
    ):
        rc = cli([*argv, "--out", str(out), "--gradient_checkpointing", "true"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert "does not support --gradient_checkpointing" in err[0]
        assert not out.exists()
