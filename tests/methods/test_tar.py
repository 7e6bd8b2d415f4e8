"""TAR: the entropy term by hand, the first-order outer gradient on a 2-parameter toy whose
inner AdamW loop is written out here, the adversary never touching the module's weights, the
initial safeguard, a few steps through the training loop, and bad settings."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tiny_models import lora_copy, tiny_gpt_neox
from unlearn.cli import main as cli
from unlearn.data.batching import collate
from unlearn.errors import UsageError
from unlearn.methods.base import Reference, StepContext
from unlearn.methods.tar import TAR, TARConfig, adversary, first_order, neg_entropy


def test_negative_entropy_by_hand():
    # V = 2: uniform (H = log 2) and p = (1/4, 3/4) (H = -(1/4 log 1/4 + 3/4 log 3/4)); the
    # padded position's one-hot distribution must not count.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [30.0, -30.0]]])
    mask = torch.tensor([[1, 1, 0]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    expected = -(math.log(2.0) + h) / 2 / math.log(2.0)
    assert float(neg_entropy(logits, mask)) == pytest.approx(expected, rel=1e-6)
    assert float(neg_entropy(torch.zeros(1, 1, 7), torch.ones(1, 1))) == pytest.approx(-1.0)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.tensor(-0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x + self.b


def _mse_and_grad(a: float, b: float, xs: list[float], ys: list[float]):
    """mean (a x + b - y)² and its gradient in (a, b), by hand."""
    r = [a * x + b - y for x, y in zip(xs, ys, strict=True)]
    n = len(r)
    loss = sum(v * v for v in r) / n
    return loss, (sum(2 * v * x for v, x in zip(r, xs, strict=True)) / n, sum(2 * v for v in r) / n)


def test_outer_gradient_is_the_first_order_formula_on_a_toy():
    xa, ya = [1.0, 2.0], [2.0, 1.0]  # the adversary's data
    xt, yt = [0.5, -1.0], [1.0, 0.0]  # held back: the tamper-resistance loss
    lr, steps, b1, b2, eps = 0.1, 2, 0.9, 0.999, 1e-8
    # The inner loop by hand: AdamW without weight decay, from (a, b) = (0.5, -0.3).
    theta, m, v = [0.5, -0.3], [0.0, 0.0], [0.0, 0.0]
    for t in range(1, steps + 1):
        _, g = _mse_and_grad(*theta, xa, ya)
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            theta[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    tr_value, tr_grad = _mse_and_grad(*theta, xt, yt)

    toy = Toy()
    params = dict(toy.named_parameters())

    def mse(xs, ys):
        return lambda mod: (mod(torch.tensor(xs)) - torch.tensor(ys)).square().mean()

    adapted, _ = adversary(toy, params, mse(xa, ya), lr, steps)
    assert [float(adapted["a"].detach()), float(adapted["b"].detach())] == pytest.approx(
        theta, rel=1e-5
    )
    assert (toy.a.item(), toy.b.item()) == (0.5, pytest.approx(-0.3))  # untouched
    term = first_order(toy, params, adapted, mse(xt, yt))
    assert term.item() == pytest.approx(tr_value, rel=1e-5)  # the loss at the attacked weights
    term.backward()
    # ...and its gradient at the original weights is the one at the attacked weights.
    assert [float(toy.a.grad), float(toy.b.grad)] == pytest.approx(list(tr_grad), rel=1e-5)


def _forget_batch():
    g = torch.Generator().manual_seed(1)
    return collate([torch.randint(1, 64, (n,), generator=g).tolist() for n in (9, 12, 6, 10)], 0)


def _context(model, reference):
    g = torch.Generator().manual_seed(2)
    retain = collate([torch.randint(1, 64, (n,), generator=g).tolist() for n in (8, 11)], 0)
    return StepContext(model, reference, forget=_forget_batch(), retain=retain, step=0,
                       total_steps=1, generator=torch.Generator().manual_seed(3))  # fmt: skip


def test_tamper_term_on_a_real_model_is_an_ordinary_adamw_attack_then_its_gradient():
    """The adversary on the functional copy equals torch AdamW on a deep copy of the model; the
    module's own weights stay bitwise as they were; the term's gradient is the copy's."""
    model = tiny_gpt_neox(3, seed=0, initializer_range=0.2).requires_grad_(True)
    method = TAR(TARConfig(inner_steps=2, adversary_lrs=[1e-2]))
    method.setup(model, None)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    terms = method.loss(_context(model, Reference(model, copy.deepcopy(model))))
    assert set(terms) == {"forget", "retain", "retain_lm", "attack_ce"}
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())

    batch = _forget_batch()  # rows 0-1: the adversary's, rows 2-3: held back
    attacked = copy.deepcopy(model)
    opt = torch.optim.AdamW(attacked.parameters(), lr=1e-2, weight_decay=0.0)
    ids, mask = batch.input_ids[:2], batch.attention_mask[:2]
    for _ in range(2):
        logits = attacked(ids, attention_mask=mask).logits
        pairs = (mask[:, :-1] * mask[:, 1:]).bool()
        ce = nn.functional.cross_entropy(logits[:, :-1][pairs], ids[:, 1:][pairs])
        opt.zero_grad()
        ce.backward()
        opt.step()
    opt.zero_grad()
    logits = attacked(batch.input_ids[2:], attention_mask=batch.attention_mask[2:]).logits
    p = logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1)[batch.attention_mask[2:].bool()].mean()
    hand = -entropy / math.log(64)
    assert terms["forget"].item() == pytest.approx(hand.item(), rel=1e-4)
    hand.backward()
    terms["forget"].backward()
    for (name, p), q in zip(model.named_parameters(), attacked.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_with_lora_only_the_adapters_are_attacked_and_trained():
    model = lora_copy(tiny_gpt_neox(3, seed=0), r=2, seed=1).train()
    method = TAR(TARConfig(inner_steps=1))
    method.setup(model, None)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    terms = method.loss(_context(model, Reference(model)))
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    sum(w * terms[n] for n, w in method.weights(0, 1).items()).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(math.isfinite(t.item()) for t in terms.values())


def _run_config(world, out, **overrides):
    from unlearn.recipes.unlearning import build_run_config

    values = {"world": str(world.root), "out": str(out), "max_steps": 2, "pdbs": 2,
              "grad_accum": 1, "num_train_examples": 8, "progress": False,
              "inner_steps": 1}  # fmt: skip
    return build_run_config("tar", {**values, **overrides})


def test_trains_a_few_steps_through_the_loop(tiny_world, tmp_path):
    from unlearn.recipes.unlearning import prepare, validate
    from unlearn.training.loop import train

    rows = []
    for lora in (False, True):
        cfg = _run_config(tiny_world, tmp_path / f"r{lora}", lora=lora)
        p = prepare(cfg, validate(cfg), tmp_path / f"r{lora}")
        before = {n: t.detach().clone() for n, t in p.model.named_parameters() if t.requires_grad}
        train(p.model, p.method, p.reference, p.forget, p.retain, cfg.train, p.plan,
              on_log=lambda step, values: rows.append(values), progress=False)  # fmt: skip
        assert any(not torch.equal(before[n], t) for n, t in p.model.named_parameters()
                   if n in before)  # fmt: skip
    assert len(rows) == 4
    for row in rows:
        assert {"forget", "retain", "retain_lm", "attack_ce", "coef_retain_lm"} <= set(row)
        assert all(math.isfinite(v) for v in row.values())
        assert -1 <= row["forget"] <= 0


def test_initial_safeguard_starts_the_trained_model_and_leaves_the_reference(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    from unlearn.config.settings import LoraSettings
    from unlearn.models.lora import attach_lora
    from unlearn.recipes.unlearning import prepare, validate

    original = AutoModelForCausalLM.from_pretrained(tiny_world.target)
    g = torch.Generator().manual_seed(0)
    # Full fine-tuning: another run's directory, whose OUT/model holds changed weights.
    guarded = copy.deepcopy(original)
    with torch.no_grad():
        for p in guarded.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    guarded.save_pretrained(tmp_path / "rmu-run" / "model")
    cfg = _run_config(
        tiny_world, tmp_path / "full", lora=False, safeguard=str(tmp_path / "rmu-run")
    )
    p = prepare(cfg, validate(cfg), tmp_path / "full")
    for (name, t), ref, want in zip(p.model.state_dict().items(),
                                    p.reference.copy.state_dict().values(),
                                    guarded.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(t, want), name
        assert torch.equal(ref, original.state_dict()[name]), name
    # LoRA: the adapter directory, loaded into the adapters; the base stays the original.
    adapted = attach_lora(copy.deepcopy(original), LoraSettings())
    with torch.no_grad():
        for name, t in adapted.named_parameters():
            if "lora_" in name:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    adapted.save_pretrained(tmp_path / "lora-run" / "adapter")
    cfg = _run_config(
        tiny_world, tmp_path / "lora", lora=True, safeguard=str(tmp_path / "lora-run")
    )
    p = prepare(cfg, validate(cfg), tmp_path / "lora")
    mine = {n: t for n, t in p.model.named_parameters() if "lora_" in n}
    assert mine and all(
        torch.equal(t, dict(adapted.named_parameters())[n]) for n, t in mine.items()
    )
    batch = p.retain.batch(0)
    with torch.no_grad():
        ref = p.reference.forward(batch).logits
        base = original(batch.input_ids, attention_mask=batch.attention_mask).logits
        cur = p.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(ref, base)
    assert not torch.allclose(cur, base, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inner_steps": 0}, "--inner_steps must be >= 1"),
        ({"adversary_lrs": []}, "--adversary_lrs needs at least one"),
        ({"adversary_lrs": [1e-3, -1e-4]}, "--adversary_lrs must all be > 0"),
        ({"remove_coef": -1.0}, "--remove_coef must be >= 0"),
        ({"retain_lm_coef": -0.1}, "--retain_lm_coef must be >= 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message):
        TARConfig(**kwargs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--safeguard", "{tmp}/nowhere"], "--safeguard {tmp}/nowhere is not a directory"),
        (["--safeguard", "{tmp}"], "holds no model (model/config.json or config.json)"),
        (["--safeguard", "{target}", "--lora", "true"], "holds no LoRA adapter"),
        (["--distributed", "fsdp2"], "method tar does not support --distributed fsdp2"),
        (["--pdbs", "1"], "--pdbs must be >= 2, got 1"),
        (["--inner_steps", "0"], "--inner_steps must be >= 1"),
    ],
)
def test_bad_run_exits_2_before_loading(tiny_world, tmp_path, capsys, monkeypatch, args, message):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before validation finished")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    out = tmp_path / "bad"
    fill = {"tmp": str(tmp_path), "target": str(tiny_world.target)}
    argv = [a.format(**fill) for a in args]
    rc = cli(["run", "--method", "tar", "--world", str(tiny_world.root), "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message.format(**fill) in err and len(err.splitlines()) == 1, err
    assert not out.exists()
