"""RepNoise: its terms by hand (MMD of tiny samples, the bounded ascent), inside the method
against plain HF forwards, a few steps through the training loop, and bad settings."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tiny_models import tiny_gpt_neox
from unlearn.cli import main as cli
from unlearn.data.batching import collate
from unlearn.errors import UsageError
from unlearn.methods.base import Reference, StepContext
from unlearn.methods.repnoise import RepNoise, RepNoiseConfig, mmd2, unlikelihood


def test_mmd_of_two_tiny_samples_by_hand():
    # X = {0, 1}, Y = {0, 2}: squared distances XX {0, 1}, YY {0, 4}, XY {0, 4, 1, 1}, so
    # MMD² = [(2 + 2k(1)) + (2 + 2k(4)) - 2(k(0) + k(4) + 2k(1))] / 4 = (1 - k(1)) / 2.
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    assert float(mmd2(x, y, [1.0])) == pytest.approx((1 - math.exp(-0.5)) / 2, rel=1e-6)
    k1 = (math.exp(-1 / 2) + math.exp(-1 / 8)) / 2  # mean over σ = 1, 2
    assert float(mmd2(x, y, [1.0, 2.0])) == pytest.approx((1 - k1) / 2, rel=1e-6)
    # Distances are per hidden dimension: the same points on the diagonal of 2-D give the same.
    assert float(mmd2(x.repeat(1, 2), y.repeat(1, 2), [1.0])) == pytest.approx(
        (1 - math.exp(-0.5)) / 2, rel=1e-6
    )
    assert float(mmd2(y, y, [1.0])) == pytest.approx(0.0, abs=1e-7)


def test_mmd_gradient_is_finite_where_samples_coincide():
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 0.0]], requires_grad=True)
    mmd2(x, torch.zeros(2, 2), [1.0]).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bounded_ascent_by_hand():
    # Vocabulary of 2; row 0 predicts token 1 with p = 3/4, then token 0 with p = 1/2; the last
    # position predicts a pad token and does not count; row 1 is padding after one token.
    logits = torch.tensor(
        [[[0.0, math.log(3.0)], [0.0, 0.0], [9.0, -9.0]], [[5.0, 0.0], [1.0, 2.0], [3.0, 0.0]]]
    )
    ids = torch.tensor([[0, 1, 0], [1, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    value = float(unlikelihood(logits, ids, mask))
    assert value == pytest.approx((math.log(4.0) + math.log(2.0)) / 2, rel=1e-6)  # -log(1 - p)
    # Bounded: a token already unlikely adds ~0 and pulls no more; a certain one stays finite.
    one = torch.tensor([[0, 0]]), torch.tensor([[1, 1]])
    gone = torch.tensor([[[-40.0, 40.0], [0.0, 0.0]]], requires_grad=True)
    value = unlikelihood(gone, *one)
    value.backward()
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-12)
    assert float(gone.grad.abs().max()) < 1e-12
    certain = torch.tensor([[[100.0, -100.0], [0.0, 0.0]]], requires_grad=True)
    value = unlikelihood(certain, *one)
    value.backward()
    assert float(value.detach()) == pytest.approx(200.0, rel=1e-6)
    assert torch.isfinite(certain.grad).all() and float(certain.grad.abs().max()) <= 1.0


def _kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over σ = 1, 3 of exp(-mean_dim (a_i - b_j)² / 2σ²), by broadcasting."""
    sq = ((a[:, None, :] - b[None, :, :]) ** 2).mean(-1)
    return (torch.exp(-sq / 2) + torch.exp(-sq / 18)) / 2


def test_terms_inside_the_method_match_plain_forwards():
    """forget, noise and retain recomputed from an HF forward (hidden_states[l + 1] is block l's
    output) and the same seeded noise draws, with plain arithmetic."""
    model = tiny_gpt_neox(4, seed=0, initializer_range=0.2)
    g = torch.Generator().manual_seed(0)
    batch = collate([torch.randint(1, 64, (n,), generator=g).tolist() for n in (9, 12, 6)], 0)
    # The CE retain term, checked by hand here (the default KL is the term every method shares).
    cfg = RepNoiseConfig(
        layers=[0, 2], noise_bandwidths=[1.0, 3.0], noise_tokens=1000, retain_loss="ce"
    )
    method = RepNoise(cfg)
    method.setup(model, None)
    assert method.layers == [0, 2]
    reference = Reference(model, copy.deepcopy(model))
    generator = torch.Generator().manual_seed(7)
    ctx = StepContext(model, reference, batch, batch, step=0, total_steps=1, generator=generator)
    with torch.no_grad():
        terms = method.loss(ctx)
        out = model(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    valid = batch.mask.reshape(-1)
    draws = torch.Generator().manual_seed(7)  # every token is used: no subsampling draw
    per_layer = []
    for layer in (0, 2):
        x = out.hidden_states[layer + 1].reshape(-1, 32)[valid]
        y = torch.randn(x.shape, generator=draws)
        per_layer.append(_kernel(x, x).mean() + _kernel(y, y).mean() - 2 * _kernel(x, y).mean())
    assert float(terms["noise"]) == pytest.approx(float(sum(per_layer) / 2), rel=1e-4)
    p = out.logits[:, :-1].softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    pairs = batch.mask[:, :-1] & batch.mask[:, 1:]
    assert float(terms["forget"]) == pytest.approx(float(-torch.log1p(-p)[pairs].mean()), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1][pairs], batch.input_ids[:, 1:][pairs])
    assert float(terms["retain"]) == pytest.approx(float(ce), rel=1e-5)


def test_weights_and_default_layers():
    method = RepNoise(RepNoiseConfig(remove_coef=2.0, retain_coef=3.0, noise_coef=0.5))
    assert method.weights(0, 10) == {"forget": 2.0, "retain": 3.0, "noise": 0.5}
    assert method.weights(9, 10) == {"forget": 2.0, "retain": 3.0, "noise": 0.5}  # constant
    method.setup(tiny_gpt_neox(3), None)
    assert method.layers == [0, 1, 2]  # every block by default
    assert RepNoiseConfig().retain_loss == "kl"  # the calibrated default


def test_trains_a_few_steps_through_the_loop(tiny_world, tmp_path):
    from unlearn.recipes.unlearning import build_run_config, prepare, validate
    from unlearn.training.loop import train

    rows = []
    for lora in (False, True):
        out = tmp_path / f"r{lora}"
        cfg = build_run_config(
            "repnoise",
            {"world": str(tiny_world.root), "out": str(out), "max_steps": 2, "pdbs": 2,
             "grad_accum": 1, "num_train_examples": 8, "progress": False, "lora": lora,
             "noise_tokens": 64},
        )  # fmt: skip
        p = prepare(cfg, validate(cfg), out)
        before = {n: t.detach().clone() for n, t in p.model.named_parameters() if t.requires_grad}
        train(p.model, p.method, p.reference, p.forget, p.retain, cfg.train, p.plan,
              on_log=lambda step, values: rows.append(values), progress=False)  # fmt: skip
        after = dict(p.model.named_parameters())
        assert any(not torch.equal(before[n], after[n]) for n in before)
    assert len(rows) == 4
    for row in rows:
        assert {"forget", "noise", "retain", "coef_noise"} <= set(row)
        assert all(math.isfinite(v) for v in row.values())
        assert 0 < row["noise"] <= 2 and row["forget"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_coef": -1.0}, "--noise_coef must be >= 0"),
        ({"remove_coef": -0.5}, "--remove_coef must be >= 0"),
        ({"noise_bandwidths": []}, "--noise_bandwidths needs at least one"),
        ({"noise_bandwidths": [1.0, 0.0]}, "--noise_bandwidths must be > 0"),
        ({"noise_tokens": 1}, "--noise_tokens must be >= 2"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message):
        RepNoiseConfig(**kwargs)


def test_bad_setting_exits_2_before_loading(tiny_world, tmp_path, capsys, monkeypatch):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before validation finished")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    out = tmp_path / "bad"
    rc = cli(["run", "--method", "repnoise", "--world", str(tiny_world.root), "--out", str(out),
              "--noise_bandwidths", "-1"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--noise_bandwidths must be > 0" in err and len(err.splitlines()) == 1
    assert not out.exists()
