"""Ridge accumulator maths, the affine-maps file format, and fits between tiny GPT-NeoX models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from fit_helpers import FIT_TEXTS, count_fits, fitting_env
from tiny_models import tiny_gpt_neox
from unlearn.errors import UsageError
from unlearn.readouts.affine import (
    AffineMaps,
    RidgeAccumulator,
    fit_affine,
    load_affine,
    save_affine,
)
from unlearn.readouts.hooks import forward_hiddens


def linear_data(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    # Offset and uneven scales, as in a real residual stream, so centring matters.
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) * torch.tensor([1, 3, 0.5, 2, 10.0])
    x = x + 4.0
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    y = x @ w + b + 1e-6 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, y, w, b


# ---- RidgeAccumulator -------------------------------------------------------------------------


def test_accumulator_recovers_weight_and_bias():
    x, y, w, b = linear_data()
    acc = RidgeAccumulator(5, 3)
    acc.update(x.float(), y.float())
    w_hat, b_hat = acc.solve(alpha=1e-12)
    assert acc.count == 600
    torch.testing.assert_close(w_hat, w, atol=1e-4, rtol=0)
    torch.testing.assert_close(b_hat, b, atol=1e-3, rtol=0)


def test_accumulating_in_chunks_equals_one_chunk():
    x, y, _, _ = linear_data()
    whole, chunked = RidgeAccumulator(5, 3), RidgeAccumulator(5, 3)
    whole.update(x, y)
    for lo, hi in ((0, 100), (100, 350), (350, 350), (350, 600)):
        chunked.update(x[lo:hi], y[lo:hi])
    for a, c in zip(whole.solve(0.1), chunked.solve(0.1), strict=True):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-12)


def test_ridge_hand_value_in_one_dimension():
    # x = 1, 2, 3: mean 2, variance 2/3. y = 2x + 1: Cxy = 4/3. Relative alpha 0.5 adds
    # 0.5 * 2/3 = 1/3 to the variance, so W = (4/3) / (2/3 + 1/3) = 4/3 and b = 5 - 2 W = 7/3.
    acc = RidgeAccumulator(1, 1)
    x = torch.tensor([[1.0], [2.0], [3.0]])
    acc.update(x, 2 * x + 1)
    w, b = acc.solve(alpha=0.5)
    assert abs(w.item() - 4 / 3) < 1e-12
    assert abs(b.item() - 7 / 3) < 1e-12
    w0, b0 = acc.solve(alpha=0.0)
    assert abs(w0.item() - 2.0) < 1e-12 and abs(b0.item() - 1.0) < 1e-12


def test_alpha_shrinks_w_and_is_relative_to_the_input_scale():
    x, y, _, _ = linear_data(n=40)
    norms = []
    for alpha in (0.0, 0.1, 1.0, 10.0):
        acc = RidgeAccumulator(5, 3)
        acc.update(x, y)
        norms.append(torch.linalg.matrix_norm(acc.solve(alpha)[0]).item())
    assert norms == sorted(norms, reverse=True) and norms[-1] < 0.5 * norms[0]
    # Scaling the inputs by 1000 scales W by 1/1000 for the same (relative) alpha.
    small, big = RidgeAccumulator(5, 3), RidgeAccumulator(5, 3)
    small.update(x, y)
    big.update(1000 * x, y)
    torch.testing.assert_close(big.solve(1.0)[0] * 1000, small.solve(1.0)[0])


def test_accumulator_errors():
    acc = RidgeAccumulator(2, 2)
    with pytest.raises(ValueError, match="no tokens"):
        acc.solve(1.0)
    with pytest.raises(ValueError, match="widths"):
        acc.update(torch.zeros(4, 3), torch.zeros(4, 2))
    acc.update(torch.ones(1, 2), torch.ones(1, 2))  # one token: zero covariance
    with pytest.raises(ValueError, match="singular"):
        acc.solve(0.0)
    with pytest.raises(ValueError, match="alpha"):
        acc.solve(-1.0)


# ---- AffineMaps and the file format -----------------------------------------------------------


def small_maps() -> AffineMaps:
    g = torch.Generator().manual_seed(3)
    return AffineMaps(
        layers=[1, 4],
        weights={1: torch.randn(3, 2, generator=g), 4: torch.randn(3, 2, generator=g)},
        biases={1: torch.randn(2, generator=g), 4: torch.randn(2, generator=g)},
        alpha=0.01,
        d_in=3,
        d_out=2,
        heldout_mse={1: 0.25, 4: 0.5},
        heldout_target_var={1: 1.0, 4: 2.0},
        source="ckpt/step-100",
        target="models/target",
        fit_tokens=1000,
        heldout_tokens=200,
    )


def test_apply_is_x_w_plus_b_in_the_input_dtype():
    maps = small_maps()
    x = torch.tensor([[1.0, 0.0, 2.0]])
    expected = maps.weights[4][0] + 2 * maps.weights[4][2] + maps.biases[4]
    torch.testing.assert_close(maps.apply(4, x)[0], expected)
    assert maps.apply(4, x.bfloat16()).dtype == torch.bfloat16
    assert maps.heldout_relative_mse == {1: 0.25, 4: 0.25}
    with pytest.raises(KeyError):
        maps.apply(2, x)


def test_affine_maps_validation():
    maps = small_maps()
    with pytest.raises(UsageError, match="do not match"):
        AffineMaps(**{**_fields(maps), "d_out": 5})
    with pytest.raises(UsageError, match="distinct"):
        AffineMaps(**{**_fields(maps), "layers": [1, 1]})
    with pytest.raises(UsageError, match="biases"):
        AffineMaps(**{**_fields(maps), "biases": {1: maps.biases[1]}})


def _fields(maps: AffineMaps) -> dict:
    return {k: v for k, v in vars(maps).items() if not k.startswith("_")}


def test_save_load_round_trip_is_exact(tmp_path):
    maps = small_maps()
    out = save_affine(maps, tmp_path / "affine")
    assert sorted(p.name for p in out.iterdir()) == ["affine.safetensors", "metadata.json"]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["layers"] == [1, 4] and meta["heldout_relative_mse"] == {"1": 0.25, "4": 0.25}
    loaded = load_affine(out)
    for layer in maps.layers:
        assert torch.equal(loaded.weights[layer], maps.weights[layer])
        assert torch.equal(loaded.biases[layer], maps.biases[layer])
    assert _fields(loaded) == {
        **_fields(maps),
        "weights": loaded.weights,
        "biases": loaded.biases,
    }
    assert not list(tmp_path.glob(".affine.tmp-*"))  # the temp dir was renamed, not left behind


def test_load_rejects_directories_that_are_not_affine_maps(tmp_path):
    with pytest.raises(UsageError, match="not an affine-maps directory"):
        load_affine(tmp_path)
    with pytest.raises(UsageError, match="not an affine-maps directory"):
        load_affine(tmp_path / "missing")
    (tmp_path / "metadata.json").write_text(json.dumps({"kind": "tuned-lens", "format": 1}))
    with pytest.raises(UsageError, match="kind"):
        load_affine(tmp_path)
    out = save_affine(small_maps(), tmp_path / "good")
    (out / "affine.safetensors").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="unreadable"):
        load_affine(out)


# ---- fit_affine on tiny random models ---------------------------------------------------------


def tiny_model(seed: int) -> GPTNeoXForCausalLM:
    return tiny_gpt_neox(3, seed=seed, max_position_embeddings=2048).train()


def batches(seed: int, n: int, rows: int = 4, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    """Random token batches; row 1 is right-padded by 5, row 2 left-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(rows, seq, dtype=torch.long)
        mask[1, -5:] = 0
        mask[2, :3] = 0
        out.append(
            {"input_ids": torch.randint(64, (rows, seq), generator=g), "attention_mask": mask}
        )
    return out


def test_fitting_a_model_to_itself_gives_the_identity():
    model = tiny_model(0)
    model.train()
    maps = fit_affine(model, model, batches(1, 6), batches(2, 2), layers=[2, 0], alpha=1e-9)
    assert maps.layers == [0, 2] and (maps.d_in, maps.d_out) == (32, 32)
    assert maps.fit_tokens == 6 * (4 * 16 - 8) and maps.heldout_tokens == 2 * (4 * 16 - 8)
    for layer in maps.layers:
        torch.testing.assert_close(maps.weights[layer], torch.eye(32), atol=1e-5, rtol=0)
        assert maps.heldout_relative_mse[layer] < 1e-6
        assert maps.heldout_target_var[layer] > 0
    assert model.training  # the caller's mode is restored


def test_heldout_mse_is_measured_on_heldout_block_outputs():
    source, target = tiny_model(0), tiny_model(1)
    fit, held = batches(1, 1), batches(2, 3)  # 56 fitting tokens in 32 dims: overfits
    maps = fit_affine(source, target, fit, held, layers=[0, 1], alpha=1e-3)
    for layer in maps.layers:
        sq, var_rows, n = 0.0, [], 0
        for b in held:
            valid = b["attention_mask"].bool()
            x = forward_hiddens(source, b["input_ids"], b["attention_mask"], [layer])[layer]
            with torch.no_grad():
                out = target(**b, output_hidden_states=True)
            y = out.hidden_states[layer + 1][valid]  # block l's output, independently of hooks
            sq += (maps.apply(layer, x[valid].detach()) - y).double().square().sum().item()
            var_rows.append(y.double())
            n += int(valid.sum())
        expected_mse = sq / (n * 32)
        expected_var = torch.cat(var_rows).var(dim=0, unbiased=False).mean().item()
        assert abs(maps.heldout_mse[layer] - expected_mse) < 1e-5 * expected_mse
        assert abs(maps.heldout_target_var[layer] - expected_var) < 1e-6 * expected_var
        assert maps.heldout_mse[layer] > 1e-3 * expected_var  # the held-out text is not fitted


def test_padded_tokens_do_not_change_the_fit():
    source, target = tiny_model(0), tiny_model(1)
    fit, held = batches(1, 4), batches(2, 1)
    repadded = []
    for b in fit:
        ids = b["input_ids"].clone()
        pads = b["attention_mask"] == 0
        ids[pads] = (ids[pads] + 17) % 64  # different tokens, only where padded
        repadded.append({"input_ids": ids, "attention_mask": b["attention_mask"]})
    a = fit_affine(source, target, fit, held, layers=[1, 2], alpha=1e-2)
    c = fit_affine(source, target, repadded, held, layers=[1, 2], alpha=1e-2)
    assert a.fit_tokens == sum(int(b["attention_mask"].sum()) for b in fit)
    for layer in (1, 2):
        torch.testing.assert_close(a.weights[layer], c.weights[layer], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.biases[layer], c.biases[layer], atol=1e-6, rtol=1e-5)
    # ... while counting the padded positions as tokens would change it.
    unmasked = [{**b, "attention_mask": torch.ones_like(b["attention_mask"])} for b in repadded]
    d = fit_affine(source, target, unmasked, held, layers=[1], alpha=1e-2)
    assert not torch.allclose(a.weights[1], d.weights[1], atol=1e-4)


def test_fit_affine_rejects_bad_input():
    model = tiny_model(0)
    with pytest.raises(UsageError, match="out of range"):
        fit_affine(model, model, batches(1, 1), batches(2, 1), layers=[3], alpha=0.1)
    with pytest.raises(UsageError, match="alpha"):
        fit_affine(model, model, batches(1, 1), batches(2, 1), layers=[0], alpha=-1)
    with pytest.raises(UsageError, match="attention_mask"):
        fit_affine(model, model, [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], [], [0], 0.1)
    with pytest.raises(UsageError, match="held-out"):
        fit_affine(model, model, batches(1, 1), [], layers=[0], alpha=0.1)


# ---- the fitted-affine cache (unlearn.readouts.fitting) ------------------------------------------


def test_cached_affine_maps_are_keyed_on_revisions_dtype_and_corpus(
    tiny_hf_models, tmp_path, monkeypatch
):
    from unlearn.methods.checkpoint_transfer import CheckpointTransferConfig
    from unlearn.models.load import load_model
    from unlearn.models.refs import ModelRef, resolve_model
    from unlearn.readouts.fitting import fitted_affine

    model_dir = tiny_hf_models["gpt_neox"]
    model = load_model(resolve_model(str(model_dir)))
    source = tiny_gpt_neox(3, vocab=model.config.vocab_size, seed=1)  # same width and vocab
    cfg = CheckpointTransferConfig(affine_examples=2)
    fits = count_fits(monkeypatch, "unlearn.readouts.fitting", "fit_affine")

    def fit(source_revision=None, **change):
        ref = ModelRef(str(model_dir), source_revision)
        fitted_affine(source, model, ref, fitting_env(model_dir, tmp_path, **change), [0, 1], cfg)

    fit()
    fit()
    assert len(fits) == 1  # a hit
    changes = [
        {"source_revision": "step-100"},
        {"revision": "step-200"},
        {"dtype": "bfloat16"},
        {"fit_texts": FIT_TEXTS[:2]},
        {"heldout_texts": FIT_TEXTS[2:]},
    ]
    for i, change in enumerate(changes, start=2):
        fit(**change)
        assert len(fits) == i, change  # a miss: fitted again
