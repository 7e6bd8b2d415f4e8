"""The field's baselines (grad_diff, npo, simnpo, rmu, rr): each loss term against a hand value,
its sign through one optimizer step, GradDiff's divergence caught, RMU training only the MLPs it
names, and their bad values refused in one line."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tiny_models import lora_copy, tiny_gpt_neox
from unlearn.cli import main as cli
from unlearn.config.settings import TrainConfig
from unlearn.data.batching import Batch, ExampleStream, collate
from unlearn.errors import UsageError
from unlearn.methods.base import Method, Reference, StepContext
from unlearn.methods.grad_diff import GradDiff, GradDiffConfig
from unlearn.methods.npo import NPO, NPOConfig
from unlearn.methods.rmu import RMU, RMUConfig
from unlearn.methods.rr import RR, RRConfig
from unlearn.methods.simnpo import SimNPO, SimNPOConfig
from unlearn.training import losses
from unlearn.training.loop import make_plan, train

VOCAB = 64


def _examples(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (k,), generator=g).tolist() for k in (12, 9, 12, 6)]


def _batch(seed: int) -> Batch:
    return collate(_examples(seed), pad_id=0)


def _seq_logp(model, batch: Batch) -> torch.Tensor:
    """Plain per-sequence log-likelihood: sum over valid pairs of log p(x_t | x_<t)."""
    logp = torch.log_softmax(model(input_ids=batch.input_ids).logits.float(), -1)
    out = []
    for i, n in enumerate(batch.attention_mask.sum(1).tolist()):
        ids = batch.input_ids[i, :n]
        out.append(sum(logp[i, t - 1, ids[t]] for t in range(1, n)))
    return torch.stack(out)


# -- pure loss terms -------------------------------------------------------------------------


def test_token_and_sequence_logprobs_by_hand():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    ids, mask = torch.tensor([[0, 2, 1]]), torch.tensor([[1, 1, 0]])
    token = losses.token_logprobs(logits, ids, mask)
    expected = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), -1)[2]
    torch.testing.assert_close(token, torch.tensor([[0.0, float(expected), 0.0]]))
    total, count = losses.sequence_logprob(token, mask)
    assert count.tolist() == [1] and float(total[0]) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="no scored token"):
        losses.sequence_logprob(token, torch.tensor([[1, 0, 0]]))


def test_npo_simnpo_and_rerouting_by_hand():
    logp, ref = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -1.0])
    expected = (2 / 0.5) * (math.log(2) + math.log1p(math.exp(-1.0))) / 2
    assert float(losses.npo_loss(logp, ref, 0.5)) == pytest.approx(expected)
    # Equal to the reference: (2/β) log 2; less likely than the reference: lower.
    assert float(losses.npo_loss(ref, ref, 0.1)) == pytest.approx(20 * math.log(2))
    assert float(losses.npo_loss(ref - 1, ref, 0.1)) < 20 * math.log(2)
    simnpo = losses.simnpo_loss(torch.tensor([-4.0, -6.0]), torch.tensor([2, 3]), 2.0, 0.5)
    assert float(simnpo) == pytest.approx(math.log1p(math.exp(-3.5)))
    # Sign: a less likely forget sequence has a lower SimNPO term.
    lower = losses.simnpo_loss(torch.tensor([-8.0, -9.0]), torch.tensor([2, 3]), 2.0, 0.5)
    assert float(lower) < float(simnpo)
    h = torch.randn(2, 3, 8)
    mask = torch.ones(2, 3)
    assert float(losses.rerouting_loss([h], [h], mask)) == pytest.approx(1.0)
    assert float(losses.rerouting_loss([-h], [h], mask)) == pytest.approx(0.0)
    assert float(losses.rerouting_loss([-h], [h], mask, orthogonal=True)) == pytest.approx(1.0)


# -- the terms inside the methods --------------------------------------------------------------


def _context(model, reference, step: int = 0, total: int = 1) -> StepContext:
    return StepContext(model, reference, _batch(1), _batch(2), step=step, total_steps=total,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip


def _setup(method: Method, model) -> Method:
    Method.setup(method, model, None)
    return method


def test_npo_reference_term_is_the_frozen_original():
    """With LoRA the reference is the adapter-disabled model: after the adapters move, the
    term is (2/β)·mean softplus(β(log π_θ - log π_ref)) computed from two plain forwards."""
    base = tiny_gpt_neox(3, VOCAB, seed=0, initializer_range=0.2)
    model = lora_copy(base, r=4, seed=1)  # adapters already away from the identity
    method = _setup(NPO(NPOConfig(beta=0.5)), model)
    terms = method.loss(_context(model, Reference(model)))
    with torch.no_grad():
        cur, ref = _seq_logp(model, _batch(1)), _seq_logp(base, _batch(1))
    expected = (2 / 0.5) * F.softplus(0.5 * (cur - ref)).mean()
    torch.testing.assert_close(terms["forget"], expected, rtol=1e-5, atol=1e-6)
    # Before any change the model is its reference: exactly (2/β) log 2.
    fresh = _setup(NPO(NPOConfig(beta=0.5)), base)
    same = fresh.loss(_context(base, Reference(base, frozen_copy=copy.deepcopy(base))))
    assert float(same["forget"].detach()) == pytest.approx(4 * math.log(2), rel=1e-6)


def test_simnpo_and_grad_diff_terms_by_hand():
    model = tiny_gpt_neox(3, VOCAB, seed=0, initializer_range=0.2)
    reference = Reference(model, frozen_copy=copy.deepcopy(model))
    batch = _batch(1)
    with torch.no_grad():
        logp = _seq_logp(model, batch)
        lengths = batch.attention_mask.sum(1) - 1
        ce = -logp.sum() / lengths.sum()
    simnpo = _setup(SimNPO(SimNPOConfig(beta=2.0, gamma=0.1)), model)
    expected = (2 / 2.0) * F.softplus(2.0 * logp / lengths + 0.1).mean()
    got = simnpo.loss(_context(model, reference))["forget"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    grad_diff = _setup(GradDiff(GradDiffConfig()), model)
    terms = grad_diff.loss(_context(model, reference))
    torch.testing.assert_close(terms["forget"], -ce, rtol=1e-5, atol=1e-6)  # ascent: negated
    capped = _setup(GradDiff(GradDiffConfig(ascent_cap=0.5)), model)
    assert float(capped.loss(_context(model, reference))["forget"].detach()) == pytest.approx(-0.5)


def test_rmu_and_rr_terms_by_hand():
    model = tiny_gpt_neox(4, VOCAB, seed=0, initializer_range=0.2)
    original = copy.deepcopy(model)
    reference = Reference(model, frozen_copy=original)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch(1)
    valid = batch.attention_mask.bool()
    rmu = RMU(RMUConfig(layers=[2], steering_coef=7.0))
    rmu.setup(model, type("Env", (), {"device": torch.device("cpu")})())
    assert rmu.trained == [0, 1, 2] and float(rmu.target.norm()) == pytest.approx(7.0)
    with torch.no_grad():
        h = model(input_ids=batch.input_ids, output_hidden_states=True).hidden_states[3]
    expected = (h - rmu.target).square().mean(-1)[valid].mean()
    terms = rmu.loss(_context(model, reference))
    torch.testing.assert_close(terms["forget"], expected, rtol=1e-5, atol=1e-6)
    # Retain: squared error to the original's activations at the layer, trainable side live.
    with torch.no_grad():
        h0 = original(input_ids=_batch(2).input_ids, output_hidden_states=True).hidden_states[3]
        h1 = model(input_ids=_batch(2).input_ids, output_hidden_states=True).hidden_states[3]
    retain_valid = _batch(2).attention_mask.bool()
    expected = (h1 - h0).square().mean(-1)[retain_valid].mean()
    torch.testing.assert_close(terms["retain"], expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(terms["retain"], [p for p in model.parameters()], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # not detached
    rr = _setup(RR(RRConfig(layers=[1, 2])), model)
    with torch.no_grad():
        cur = model(input_ids=batch.input_ids, output_hidden_states=True).hidden_states
        orig = original(input_ids=batch.input_ids, output_hidden_states=True).hidden_states
    cos = [F.cosine_similarity(cur[i + 1], orig[i + 1], dim=-1).relu()[valid].mean()
           for i in (1, 2)]  # fmt: skip
    got = rr.loss(_context(model, reference))["forget"]
    torch.testing.assert_close(got, torch.stack(cos).mean(), rtol=1e-5, atol=1e-6)
    # The coefficients move against each other: forget from c_f to c_f/2, retain 0 to c_r/2.
    assert rr.weights(0, 10) == {"forget": 5.0, "retain": 0.0}
    assert rr.weights(10, 10) == {"forget": 2.5, "retain": 2.5}


@pytest.mark.parametrize(
    ("method", "objective"),
    [
        (lambda: GradDiff(GradDiffConfig(retain_coef=0.0)), "ce_up"),
        (lambda: NPO(NPOConfig(retain_coef=0.0)), "logp_down"),
        (lambda: SimNPO(SimNPOConfig(retain_coef=0.0)), "logp_down"),
    ],
)
def test_one_step_lowers_each_forget_objective(method, objective):
    """One AdamW step of the real training loop moves the forget text's likelihood down (a
    flipped sign would raise it)."""
    model = tiny_gpt_neox(3, VOCAB, seed=0, initializer_range=0.2)
    reference = Reference(model, frozen_copy=copy.deepcopy(model))
    model.requires_grad_(True)
    m = _setup(method(), model)
    with torch.no_grad():
        before = float(_seq_logp(model, _batch(1)).sum())
    cfg = TrainConfig(lr=1e-3, pdbs=4, grad_accum=1, max_steps=1, num_train_examples=4)
    forget = ExampleStream(_examples(1), 4, 0, seed=0)
    retain = ExampleStream(_examples(2), 4, 0, seed=1)
    train(model, m, reference, forget, retain, cfg, make_plan(cfg, 4, m.phases), progress=False)
    with torch.no_grad():
        after = float(_seq_logp(model, _batch(1)).sum())
    assert after < before - 1e-3, (objective, before, after)


def test_one_step_lowers_the_rmu_and_rr_forget_objectives():
    for make in (lambda: RMU(RMUConfig(layers=[2], retain_coef=0.0)),
                 lambda: RR(RRConfig(layers=[1, 2], retain_coef=0.0))):  # fmt: skip
        model = tiny_gpt_neox(4, VOCAB, seed=0, initializer_range=0.2)
        reference = Reference(model, frozen_copy=copy.deepcopy(model))
        model.requires_grad_(True)
        m = make()
        m.setup(model, type("Env", (), {"device": torch.device("cpu")})())
        for name, p in model.named_parameters():
            p.requires_grad_(m.trainable(name))
        with torch.no_grad():
            before = float(m.loss(_context(model, reference))["forget"])
        cfg = TrainConfig(lr=1e-2, pdbs=4, grad_accum=1, max_steps=1, num_train_examples=4)
        forget = ExampleStream(_examples(1), 4, 0, seed=0)
        retain = ExampleStream(_examples(2), 4, 0, seed=1)
        train(model, m, reference, forget, retain, cfg, make_plan(cfg, 4, m.phases),
              progress=False)  # fmt: skip
        with torch.no_grad():
            after = float(m.loss(_context(model, reference))["forget"])
        assert after < before - 1e-4, (m.name, before, after)


# -- end to end on the tiny world --------------------------------------------------------------


def test_rmu_trains_only_the_mlps_it_names(tiny_world, tmp_path):
    out = tmp_path / "rmu"
    rc = cli(["run", "--method", "rmu", "--world", str(tiny_world.root), "--out", str(out),
              "--layers", "2", "--trained_layers", "1", "2", "--max_steps", "2", "--pdbs", "2",
              "--grad_accum", "1", "--progress", "false"])  # fmt: skip
    assert rc == 0
    from safetensors.torch import load_file

    before = load_file(str(tiny_world.target / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all(".mlp." in k and (".layers.1." in k or ".layers.2." in k) for k in changed), changed
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"]["trained_layers"] == [1, 2]


def test_grad_diff_divergence_is_caught_and_marked(tiny_world, tmp_path):
    """Unbounded ascent at a high lr: the divergence guard stops the run as `diverged`."""
    out = tmp_path / "gd"
    rc = cli(["run", "--method", "grad_diff", "--world", str(tiny_world.root), "--out", str(out),
              "--lr", "1e-2", "--retain_coef", "0", "--max_steps", "40", "--pdbs", "4",
              "--grad_accum", "1", "--diverge_factor", "3", "--progress", "false"])  # fmt: skip
    assert rc == 1
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "diverged" and "forget" in meta["error"]
    assert not (out / "model").exists()


@pytest.mark.parametrize(
    ("method", "args", "needle"),
    [
        ("npo", ["--beta", "0"], "--beta must be > 0"),
        ("simnpo", ["--beta", "-1"], "--beta must be > 0"),
        ("rmu", ["--steering_coef", "0"], "--steering_coef must be > 0"),
        ("rmu", ["--layers", "9"], "outside the model's blocks"),
        ("rmu", ["--trained_layers", "7"], "--trained_layers [7] outside"),
        ("rr", ["--layers", "5"], "outside the model's blocks"),
        ("grad_diff", ["--ascent_cap", "-1"], "--ascent_cap must be >= 0"),
    ],
)
def test_bad_method_values_exit_2(tiny_world, tmp_path, capsys, method, args, needle):
    out = tmp_path / "bad"
    rc = cli(["run", "--method", method, "--world", str(tiny_world.root), "--out", str(out),
              *args])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_rmu_steers_one_layer():
    with pytest.raises(UsageError, match="one --layers value"):
        RMUConfig(layers=[1, 2])


def test_the_baselines_campaign_spec_is_valid(tiny_world, tmp_path, capsys):
    """`unlearn demo --campaign baselines`: its sweep (every baseline) validates on a world;
    an unknown campaign is one line."""
    from unlearn.commands.demo import BASELINE_SWEEPS
    from unlearn.recipes.campaign import write_spec
    from unlearn.sweep.spec import load_sweep

    for preset in ("tiny", "default"):
        spec = write_spec(tmp_path / preset / "sweep.yaml", tiny_world.root,
                          BASELINE_SWEEPS[preset], "demo-baselines")  # fmt: skip
        methods = {p.method for p in load_sweep(spec).points}
        assert methods == {"grad_diff", "npo", "simnpo", "rmu", "rr"}
    assert cli(["demo", "--campaign", "others", "--out", str(tmp_path / "d")]) == 2
    assert "--campaign must be one of" in capsys.readouterr().err
