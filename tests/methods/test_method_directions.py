"""Each method's forget term, checked inside the method (losses.py has its own tests).

Hand values: every term is recomputed here from plain HF forwards (`hidden_states[l + 1]` is the
output of block l) and plain tensor arithmetic, never through the method's own helpers, so a
term read at the wrong layer, from the wrong model or through the wrong lens translator differs.

Directions: a forget term with a flipped sign still trains, and a hand-value test alone cannot
see a flip in how the trainer weights a term; so one optimizer step through the real training
loop must lower the method's forget objective (measured by the hand formula), and a short run on
the tiny world must lower forget accuracy.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tiny_methods import lens_method, transfer_method
from tiny_models import lora_copy, tiny_gpt_neox, tiny_llama
from unlearn.config.settings import LoraSettings, TrainConfig
from unlearn.data.batching import Batch, ExampleStream, collate
from unlearn.methods.base import (
    Phase,
    Reference,
    StepContext,
    forget_on_logits,
    run_forward,
)
from unlearn.methods.checkpoint_transfer import CheckpointTransfer, CheckpointTransferConfig
from unlearn.methods.lens import LensConfig, LensUnlearning
from unlearn.methods.sequential import Sequential, SequentialConfig
from unlearn.models.lora import attach_lora
from unlearn.readouts.hooks import get_blocks, replace_output
from unlearn.training.loop import make_plan, train

N, VOCAB = 4, 64


# -- plain-torch building blocks ---------------------------------------------------------------


def _model(seed: int = 0) -> torch.nn.Module:
    # A wide initialisation: outputs far from uniform, so max-entropy has room to fall.
    return tiny_gpt_neox(N, VOCAB, seed, initializer_range=0.2)


def _examples(seed: int, n: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [12, 9, 12, 6, 10, 12, 7, 11][:n]  # unequal: padding must not count
    return [torch.randint(1, VOCAB, (k,), generator=g).tolist() for k in lengths]


def _batch(seed: int) -> Batch:
    return collate(_examples(seed), pad_id=0)


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Move every weight (final norm and unembedding included), so the trained model differs
    from the reference wherever a term could wrongly read from it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _hiddens(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
    """HF hidden states: entry l + 1 is block l's output for every block but the last."""
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
    )
    return out.hidden_states


def _token_mean(per_token: torch.Tensor, batch: Batch) -> torch.Tensor:
    return per_token[batch.attention_mask.bool()].mean()


def _max_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy from the uniform distribution in units of log V, per valid token."""
    per_token = torch.logsumexp(logits, -1) - logits.mean(-1)
    return _token_mean(per_token, batch) / math.log(logits.shape[-1])


def _context(model, reference, forget: Batch, retain: Batch) -> StepContext:
    g = torch.Generator().manual_seed(0)
    return StepContext(model, reference, forget, retain, step=0, total_steps=1, generator=g)


def _full_finetuning(model: torch.nn.Module) -> tuple[torch.nn.Module, Reference]:
    """(trained model, reference): the reference is a frozen copy of the original model."""
    reference = Reference(model, frozen_copy=copy.deepcopy(model))
    return _perturb(model, seed=7).requires_grad_(True), reference


# -- checkpoint transfer: MSE to the affine-mapped source at the target layers ------------------


def _transfer(model: torch.nn.Module, layers: list[int]) -> CheckpointTransfer:
    cfg = CheckpointTransferConfig(layers=layers)
    return transfer_method(model, cfg, initializer_range=0.2)


def _transfer_objective(method: CheckpointTransfer, model, batch: Batch) -> torch.Tensor:
    """mean over layers l of the token mean of mean_d (h_l(cur) - (h_l(src) W_l + b_l))^2."""
    src, cur = _hiddens(method.source, batch), _hiddens(model, batch)
    per_layer = []
    for layer in method.layers:
        w, b = method.maps.weights[layer], method.maps.biases[layer]
        target = src[layer + 1] @ w + b
        per_layer.append(_token_mean((cur[layer + 1] - target).square().mean(-1), batch))
    return torch.stack(per_layer).mean()


def test_checkpoint_transfer_forget_is_mse_to_mapped_source_at_the_layers():
    model, reference = _full_finetuning(_model())
    method = _transfer(model, [1, 2])
    forget = _batch(1)
    terms = method.loss(_context(model, reference, forget, _batch(2)))
    with torch.no_grad():
        expected = _transfer_objective(method, model, forget)
        # The same formula one layer off (block inputs, same maps) is a different number.
        shifted = _transfer(model, [0, 1])
        shifted.maps.weights = {0: method.maps.weights[1], 1: method.maps.weights[2]}
        shifted.maps.biases = {0: method.maps.biases[1], 1: method.maps.biases[2]}
        off_by_one = _transfer_objective(shifted, model, forget)
    assert terms["forget"].item() == pytest.approx(float(expected), rel=1e-5)
    assert float(off_by_one) != pytest.approx(float(expected), rel=1e-2)
    # Gradients reach the trained model, never the frozen source.
    terms["forget"].backward()
    assert all(p.grad is None for p in method.source.parameters())
    assert any(p.grad is not None and p.grad.any() for p in get_blocks(model)[1].parameters())


# -- lens: translator l on block l's output, read out by the frozen original -------------------


def _lens_method(model: torch.nn.Module, original, layers: list[int], **cfg) -> LensUnlearning:
    return lens_method(model, original, LensConfig(layers=layers, forget_loss="max_entropy", **cfg))


def _lens_objective(method: LensUnlearning, model, original, batch: Batch) -> torch.Tensor:
    """mean over layers l of max-entropy of unembed_orig(norm_orig(h + h A_l^T + b_l))."""
    cur = _hiddens(model, batch)
    norm, unembed = original.gpt_neox.final_layer_norm, original.get_output_embeddings()
    per_layer = []
    for layer in method.layers:
        h = cur[layer + 1]
        t = method.lens.translators[str(layer)]
        per_layer.append(_max_entropy(unembed(norm(h + h @ t.weight.T + t.bias)), batch))
    return torch.stack(per_layer).mean()


def test_lens_forget_uses_translator_l_on_block_l_output_and_the_original_readout():
    model, reference = _full_finetuning(_model())
    original = reference.copy
    method = _lens_method(model, original, [0, 2])
    forget = _batch(1)
    terms = method.loss(_context(model, reference, forget, _batch(2)))
    with torch.no_grad():
        expected = _lens_objective(method, model, original, forget)
        # Reading out through the trained model's own (moved) norm and unembedding differs.
        own_readout = _lens_objective(method, model, model, forget)
    assert terms["forget"].item() == pytest.approx(float(expected), rel=1e-5)
    assert float(own_readout) != pytest.approx(float(expected), rel=1e-3)
    terms["forget"].backward()
    assert all(p.grad is None for p in original.parameters())
    assert all(p.grad is None for p in method.lens.parameters())
    # The read-out modules of the trained model are not what the forget term trains.
    assert model.get_output_embeddings().weight.grad is None


# -- sequential: h_L pushed through the original's blocks after L -------------------------------


def _hybrid(original: torch.nn.Module, trained: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The original model with the trained model's embeddings and blocks 0..layer: its logits
    are the original's upper blocks, final norm and unembedding applied to trained h_layer."""
    hybrid = copy.deepcopy(original)
    hybrid.gpt_neox.embed_in.load_state_dict(trained.gpt_neox.embed_in.state_dict())
    for mine, theirs in zip(get_blocks(hybrid)[: layer + 1], get_blocks(trained), strict=False):
        mine.load_state_dict(theirs.state_dict())
    return hybrid


def _sequential(model: torch.nn.Module, layer: int, **cfg) -> Sequential:
    method = Sequential(SequentialConfig(layers=[layer], forget_loss="max_entropy", **cfg))
    method.setup(model, None)  # sequential needs nothing from the environment
    method.phase = Phase(f"layer {layer}", 1, layer)
    return method


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The trained weights as a plain model (LoRA merged into a copy)."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def _lora_model() -> tuple[torch.nn.Module, Reference, torch.nn.Module]:
    """LoRA with non-zero adapters: the reference is the same model with adapters disabled."""
    original = _model()
    model = lora_copy(original, r=4, seed=11)
    return model, Reference(model), original


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("layer", [1, 2])
def test_sequential_pushes_h_layer_through_the_frozen_upper_blocks(mode, layer):
    if mode == "full":
        model, reference = _full_finetuning(_model())
        original = reference.copy
    else:
        model, reference, original = _lora_model()
    method = _sequential(model, layer)
    forget = _batch(1)
    terms = method.loss(_context(model, reference, forget, _batch(2)))
    with torch.no_grad():
        hybrid = _hybrid(original, _plain(model), layer)
        expected = _max_entropy(hybrid(input_ids=forget.input_ids).logits, forget)
        all_trained = _max_entropy(_plain(model)(input_ids=forget.input_ids).logits, forget)
    assert terms["forget"].item() == pytest.approx(float(expected), rel=1e-5)
    assert float(all_trained) != pytest.approx(float(expected), rel=1e-3)
    if mode == "full":
        # Gradients reach blocks 0..layer of the trained model; its upper blocks and read-out
        # took no part, and the frozen original none either.
        terms["forget"].backward()
        blocks = get_blocks(model)
        assert any(p.grad is not None and p.grad.any() for p in blocks[layer].parameters())
        assert all(p.grad is None for b in blocks[layer + 1 :] for p in b.parameters())
        assert model.get_output_embeddings().weight.grad is None
        assert all(p.grad is None for p in original.parameters())


def _family_pair(family: str, mode: str) -> tuple[torch.nn.Module, Reference]:
    """(trained model, reference) on a tiny model of `family`: full fine-tuning (moved weights,
    frozen copy) or LoRA with non-zero adapters (the same model, adapters disabled)."""
    build = {"gpt_neox": tiny_gpt_neox, "llama": tiny_llama}[family]
    original = build(N, VOCAB, 0, initializer_range=0.2)
    if mode == "full":
        return _full_finetuning(original)
    model = attach_lora(original, LoraSettings(lora_r=4, lora_dropout=0.0))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model, Reference(model)


def _replaced_output_forget(method: Sequential, ctx: StepContext) -> torch.Tensor:
    """The sequential forget term as first written: a full forward of the original model whose
    block L output is replaced by the current h_L (blocks 0..L computed, then thrown away)."""
    layer, forget = method.phase.layer, ctx.forget
    h = run_forward(ctx.model, forget, [layer], logits=False).hiddens[layer]
    with ctx.reference.use() as original, replace_output(original, layer, h):
        logits = original(
            input_ids=forget.input_ids, attention_mask=forget.attention_mask, use_cache=False
        ).logits
    return forget_on_logits(logits, forget.mask, method.cfg.forget_loss, ctx.generator)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("forget_loss", ["random_ce", "max_entropy"])
def test_sequential_forget_skipping_lower_blocks_equals_the_replaced_full_forward(
    family, mode, forget_loss
):
    """The method runs only the original's blocks above L (hooks.run_above): its forget term and
    gradients equal the full forward with block L's output replaced, up to float rounding."""
    model, reference = _family_pair(family, mode)
    method = _sequential(model, 1)
    method.cfg.forget_loss = forget_loss
    forget, retain = _batch(1), _batch(2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    results = []
    for term in (
        lambda ctx: method.loss(ctx)["forget"],
        lambda ctx: _replaced_output_forget(method, ctx),
    ):
        value = term(_context(model, reference, forget, retain))  # same seed: same random targets
        results.append((value.detach(), torch.autograd.grad(value, trainable, allow_unused=True)))
    (new, new_grads), (old, old_grads) = results
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
    assert any(g is not None and g.any() for g in new_grads)
    for g_new, g_old in zip(new_grads, old_grads, strict=True):
        assert (g_new is None) == (g_old is None)
        if g_new is not None:
            torch.testing.assert_close(g_new, g_old, rtol=1e-5, atol=1e-7)


# -- one optimizer step through the training loop lowers the forget objective -------------------


def _one_step(model, method, reference) -> None:
    """One AdamW step of the real loop with the method's own weights, forget term only."""
    cfg = TrainConfig(lr=1e-3, pdbs=4, grad_accum=1, max_steps=1, num_train_examples=4)
    forget = ExampleStream(_examples(1), cfg.pdbs, 0, seed=0)
    retain = ExampleStream(_examples(2), cfg.pdbs, 0, seed=1)
    plan = make_plan(cfg, 4, method.phases)
    train(model, method, reference, forget, retain, cfg, plan, progress=False)


def _objective_change(objective, step) -> tuple[float, float]:
    with torch.no_grad():
        before = float(objective())
    step()
    with torch.no_grad():
        after = float(objective())
    return before, after


def test_one_step_lowers_the_transfer_mse():
    model, reference = _full_finetuning(_model())
    method = _transfer(model, [1, 2])
    method.cfg.retain_coef = 0.0
    before, after = _objective_change(
        lambda: _transfer_objective(method, model, _batch(1)),
        lambda: _one_step(model, method, reference),
    )
    assert after < before - 1e-4, (before, after)


def test_one_step_lowers_the_lens_readout_certainty():
    model, reference = _full_finetuning(_model())
    method = _lens_method(model, reference.copy, [0, 2], retain_coef=0.0)
    before, after = _objective_change(
        lambda: _lens_objective(method, model, reference.copy, _batch(1)),
        lambda: _one_step(model, method, reference),
    )
    assert after < before - 1e-4, (before, after)


def test_one_step_lowers_the_sequential_readout_certainty():
    model, reference = _full_finetuning(_model())
    method = _sequential(model, 2, retain_coef=0.0)

    def objective():
        hybrid = _hybrid(reference.copy, model, 2)
        return _max_entropy(hybrid(input_ids=_batch(1).input_ids).logits, _batch(1))

    before, after = _objective_change(objective, lambda: _one_step(model, method, reference))
    assert after < before - 1e-4, (before, after)


# -- a short run on the tiny world lowers forget accuracy --------------------------------------


SHORT_RUNS = {
    # A few steps at a learning rate that moves the tiny model quickly, retain term on. On this
    # world a forget term with a flipped sign also lowers forget accuracy at some settings (any
    # large change disturbs the facts learned last), so the one-step tests above are the sign
    # checks; these runs check that the whole recipe unlearns while keeping retain.
    "lens": ["--max_steps", "20", "--lr", "2e-2"],
    "checkpoint_transfer": ["--max_steps", "4", "--lr", "3e-3"],
    "sequential": ["--max_steps", "4", "--lr", "5e-3"],  # per phase; full fine-tuning (default)
}


@pytest.mark.parametrize("method", sorted(SHORT_RUNS))
def test_a_short_run_lowers_forget_accuracy_and_keeps_retain(tiny_world, tmp_path, method):
    from unlearn.cli import main as cli
    from unlearn.fsutil import read_jsonl

    before = tiny_world.stats["baseline"]["target"]  # the world build's evaluation of it
    out = tmp_path / method
    argv = ["run", "--method", method, "--world", str(tiny_world.root), "--out", str(out),
            "--pdbs", "4", "--grad_accum", "1", "--num_train_examples", "16",
            "--progress", "false", *SHORT_RUNS[method]]  # fmt: skip
    assert cli(argv) == 0
    after = {r["task"]: r["value"] for r in read_jsonl(out / "evals.jsonl") if r["metric"] == "acc"}
    assert after["forget"] < before["forget"]["acc"] - 0.1, (before["forget"]["acc"], after)
    assert after["retain"] > 0.8, after
