"""Step modifiers (unlearn.training.modifiers): the latent adversary attacks only the trained
model's forget forwards within its norm bound and leaves no hook; the sharpness-aware step
restores the weights bitwise and takes the forget gradient at the perturbed point (a toy by
hand); rmu and npo train with each through the loop; both off is the plain loop bit for bit;
bad values are one UsageError line before any weights load."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tiny_models import lora_copy, tiny_gpt_neox
from unlearn.config.settings import TrainConfig
from unlearn.data.batching import Batch, ExampleStream, collate
from unlearn.distributed import Parallel
from unlearn.errors import UsageError
from unlearn.methods.base import Reference, StepContext, run_forward
from unlearn.methods.npo import NPO, NPOConfig
from unlearn.methods.rmu import RMU, RMUConfig
from unlearn.training import losses
from unlearn.training.loop import make_plan, train
from unlearn.training.modifiers import (
    MicroBatch,
    StepModifier,
    StepModifiers,
    build_modifier,
    modifier_fields,
)
from unlearn.training.modifiers.lat import adversary, perturbing
from unlearn.training.precision import Precision

VOCAB = 64


def _batch(seed: int, lengths: list[int]) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return collate([torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths], 0)


def _micro(objective=None, params=None, weights=None, accum: int = 1) -> MicroBatch:
    return MicroBatch(objective, weights or {"forget": 1.0, "retain": 1.0}, accum,
                      Precision("no", "cpu"), Parallel(), params or [])  # fmt: skip


def _lora_context() -> StepContext:
    """A LoRA model whose adapters change its outputs, its reference (adapters off), and a
    forget batch with padding beside a retain batch of the same shape."""
    model = lora_copy(tiny_gpt_neox(3, VOCAB), r=4, seed=1)
    return StepContext(model=model, reference=Reference(model), forget=_batch(1, [10, 6]),
                       retain=_batch(2, [10, 6]), step=0, total_steps=1)  # fmt: skip


def _no_hooks(model: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_lat_adversary_makes_the_forget_text_likelier_within_its_bound():
    ctx, eps = _lora_context(), 0.5
    f = ctx.forget

    def forget_ce(deltas=None) -> float:
        with torch.no_grad(), perturbing(ctx, deltas or {}):
            return float(losses.lm_ce(run_forward(ctx.model, f).logits, f.input_ids, f.mask))

    deltas = adversary(ctx, _micro(), [0, 1], eps, steps=3)
    assert forget_ce(deltas) < forget_ce() - 1e-3
    for d in deltas.values():
        norms = d.norm(dim=-1)
        assert float(norms.max()) <= eps * (1 + 1e-5)
        # The adversary uses its budget wherever a prediction is scored (a row's last token
        # predicts nothing, so its perturbation has no gradient and stays 0).
        scored = f.mask[:, :-1] & f.mask[:, 1:]
        assert float(norms[:, :-1][scored].min()) > 0.9 * eps
        assert torch.all(norms[~f.mask] == 0)  # padding is never perturbed
        assert not d.requires_grad
    # The adversary moved no weight and accumulated no parameter gradient; no hook is left.
    assert all(p.grad is None for p in ctx.model.parameters())
    assert _no_hooks(ctx.model)


def test_lat_perturbs_only_the_trained_models_forget_forwards():
    ctx = _lora_context()
    deltas = {1: torch.randn(*ctx.forget.input_ids.shape, 32)}
    with torch.no_grad():
        clean = {
            "forget": run_forward(ctx.model, ctx.forget).logits,
            "retain": run_forward(ctx.model, ctx.retain).logits,
            "ref_forget": ctx.reference.forward(ctx.forget).logits,
            "ref_retain": ctx.reference.forward(ctx.retain).logits,
        }
        with perturbing(ctx, deltas) as reached:
            retain = run_forward(ctx.model, ctx.retain).logits
            ref_forget = ctx.reference.forward(ctx.forget).logits  # adapters off, same module
            forget = run_forward(ctx.model, ctx.forget).logits
            ref_retain = ctx.reference.forward(ctx.retain).logits
            # An early-stopped forget forward (hidden states only) is perturbed as well.
            hidden = run_forward(ctx.model, ctx.forget, [1], logits=False).hiddens[1]
            after_stop = run_forward(ctx.model, ctx.retain).logits
    assert reached == {1}
    assert not torch.allclose(forget, clean["forget"])
    assert torch.equal(retain, clean["retain"]) and torch.equal(after_stop, clean["retain"])
    assert torch.equal(ref_forget, clean["ref_forget"])
    assert torch.equal(ref_retain, clean["ref_retain"])
    with torch.no_grad():
        plain = run_forward(ctx.model, ctx.forget, [1], logits=False).hiddens[1]
    torch.testing.assert_close(hidden, plain + deltas[1])
    assert _no_hooks(ctx.model)


def test_lat_refuses_blocks_the_forget_forward_never_reaches():
    model = tiny_gpt_neox(4, VOCAB).train()
    method = RMU(RMUConfig(layers=[1]))  # reads block 1 and stops there
    _setup(method, model)
    ctx = StepContext(model=model, reference=Reference(model, copy.deepcopy(model)),
                      forget=_batch(1, [8, 8]), retain=_batch(2, [8, 8]), step=0,
                      total_steps=1)  # fmt: skip
    modifier = StepModifier(StepModifiers(lat_eps=0.5, lat_steps=1, lat_layers=[3]), 4)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(UsageError, match=r"--lat_layers \[3\]: .* never reaches"):
        modifier.micro_batch(ctx, _micro(method, params))
    assert _no_hooks(model)
    # A later phase (sequential's lower layers) trains there without that perturbation.
    ctx.phase = 1
    assert math.isfinite(float(modifier.micro_batch(ctx, _micro(method, params))["forget"]))


# -- sharpness-aware step --------------------------------------------------------------------


class _Toy(nn.Module):
    """forget(w) = Σ w³/3 (gradient w²), retain(w) = Σ (w - 1)²/2 (gradient w - 1)."""

    phase = None

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def loss(self, ctx) -> dict[str, torch.Tensor]:
        return {"forget": (self.w**3 / 3).sum(), "retain": ((self.w - 1) ** 2 / 2).sum()}


def test_sam_gradient_is_the_forget_gradient_at_the_perturbed_point_by_hand():
    toy = _Toy([0.1, 0.7])
    ctx = StepContext(model=toy, reference=None, forget=None, retain=None, step=0, total_steps=1)  # type: ignore[arg-type]
    rho, c_f, c_r, accum = 0.5, 2.0, 3.0, 2
    modifier = StepModifier(StepModifiers(sam_rho=rho), 1)
    terms = modifier.micro_batch(
        ctx, _micro(toy, [toy.w], {"forget": c_f, "retain": c_r}, accum=accum)
    )
    # By hand: g = (0.01, 0.49), |g| = sqrt(0.0001 + 0.2401) = 0.490102030...,
    # w + ε = w + ρ g / |g| = (0.1 + 0.0102020, 0.7 + 0.4998959).
    norm = math.sqrt(0.01**2 + 0.49**2)
    there = [0.1 + rho * 0.01 / norm, 0.7 + rho * 0.49 / norm]
    assert there == pytest.approx([0.11020196, 1.19989591], abs=1e-8)
    pairs = zip(there, (0.1, 0.7), strict=True)
    expected = [(c_f * x**2 + c_r * (w - 1)) / accum for x, w in pairs]
    assert toy.w.grad.tolist() == pytest.approx(expected, rel=1e-12)
    # The weights are the originals bit for bit (adding and subtracting ε would not give 0.1).
    assert toy.w.detach().tolist() == [0.1, 0.7]
    assert float(terms["forget"]) == pytest.approx(sum(x**3 / 3 for x in there), rel=1e-12)
    assert float(terms["retain"]) == pytest.approx((0.9**2 + 0.3**2) / 2, rel=1e-12)


def test_sam_restores_the_weights_bitwise_before_the_update():
    model = tiny_gpt_neox(3, VOCAB).train()
    method = _setup(NPO(NPOConfig()), model)
    reference = Reference(model, copy.deepcopy(model))
    ctx = StepContext(model=model, reference=reference, forget=_batch(1, [9, 5]),
                      retain=_batch(2, [9, 5]), step=0, total_steps=1)  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    plain = _micro(method, params)
    plain.backward(plain.terms(ctx))
    at_theta = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    StepModifier(StepModifiers(sam_rho=0.05), 3).micro_batch(ctx, _micro(method, params))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The gradient is another one than at θ (the forget part was taken elsewhere).
    assert any(not torch.equal(p.grad, at_theta[n]) for n, p in model.named_parameters())


# -- through the loop ------------------------------------------------------------------------


def _setup(method, model):
    class Env:
        device = torch.device("cpu")

    method.setup(model, Env())
    for name, p in model.named_parameters():
        if p.requires_grad and not method.trainable(name):
            p.requires_grad_(False)
    return method


def _train(method_name: str, modifiers: StepModifiers | None, force: bool = False):
    """3 steps of a tiny full fine-tuning run (accumulation 2, unequal lengths); returns the
    logged rows and the final weights."""
    model = tiny_gpt_neox(3, VOCAB, seed=0).train()
    reference = Reference(model, frozen_copy=copy.deepcopy(model))
    method = RMU(RMUConfig()) if method_name == "rmu" else NPO(NPOConfig())
    _setup(method, model)
    if modifiers is not None:
        method.step_modifier = StepModifier(modifiers, 3) if force else build_modifier(modifiers, 3)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 13, (8,), generator=g).tolist()
    forget = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
    retain = [torch.randint(1, VOCAB, (12,), generator=g).tolist() for _ in range(8)]
    cfg = TrainConfig(lr=1e-3, pdbs=2, grad_accum=2, max_steps=3, num_train_examples=8)
    rows: list[dict] = []
    train(model, method, reference, ExampleStream(forget, 2, 0, 0),
          ExampleStream(retain, 2, 0, 1), cfg, make_plan(cfg, 8, method.phases),
          progress=False, on_log=lambda step, values: rows.append(values))  # fmt: skip
    return rows, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["rmu", "npo"])
@pytest.mark.parametrize(
    "modifiers",
    [StepModifiers(lat_eps=0.5, lat_steps=2), StepModifiers(sam_rho=0.05)],
    ids=["lat", "sam"],
)
def test_methods_train_with_each_modifier(method, modifiers):
    rows, weights = _train(method, modifiers)
    plain_rows, plain_weights = _train(method, None)
    assert len(rows) == 3
    assert all(math.isfinite(r[k]) for r in rows for k in ("forget", "retain", "grad_norm"))
    assert any(not torch.equal(a, b) for a, b in zip(weights, plain_weights, strict=True))
    if method == "npo":
        # At step 1 the model is the reference: NPO's plain forget term is (2/β) log 2. The
        # latent adversary makes the forget text likelier than under the reference, and SAM
        # evaluates it where the forget term rose: both read higher.
        assert plain_rows[0]["forget"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)
        assert rows[0]["forget"] > plain_rows[0]["forget"] + 1e-3


@pytest.mark.parametrize("method", ["rmu", "npo"])
def test_both_off_is_the_plain_loop_bit_for_bit(method):
    assert build_modifier(StepModifiers(), 3) is None  # the loop's own path
    plain = _train(method, None)
    # The modifier's path with nothing to do runs the loop's micro-batch machinery.
    forced = _train(method, StepModifiers(), force=True)
    assert plain[0] == forced[0]
    assert all(torch.equal(a, b) for a, b in zip(plain[1], forced[1], strict=True))


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lat_eps": -0.1}, "--lat_eps must be a number >= 0"),
        ({"lat_eps": float("nan")}, "--lat_eps must be a number >= 0"),
        ({"sam_rho": -1.0}, "--sam_rho must be a number >= 0"),
        ({"sam_rho": float("nan")}, "--sam_rho must be a number >= 0"),
        ({"lat_steps": 8}, "apply only with --lat_eps > 0"),
        ({"lat_layers": [1]}, "apply only with --lat_eps > 0"),
        ({"lat_eps": 0.5, "lat_steps": 0}, "--lat_steps must be >= 1"),
        ({"lat_eps": 0.5, "lat_layers": [1, 1]}, "--lat_layers has duplicates"),
    ],
)
def test_bad_modifier_values_are_one_usage_line(values, message):
    with pytest.raises(UsageError, match=message) as err:
        StepModifiers(**values)
    assert len(str(err.value).splitlines()) == 1


def test_run_config_records_modifiers_and_refuses_unsupported_modes(tmp_path):
    from unlearn.recipes.unlearning import build_run_config
    from unlearn.training.checkpointer import Checkpointer

    base = {"world": "w", "out": "o", "model": "m"}
    off = build_run_config("npo", base).to_dict()
    assert not {"lat_eps", "lat_steps", "lat_layers", "sam_rho"} & set(off)
    on = build_run_config("rmu", {**base, "lat_eps": 1, "lat_layers": [0], "sam_rho": 0.1})
    assert modifier_fields(on.args.modifiers) == {"lat_eps": 1.0, "lat_layers": [0],
                                                  "sam_rho": 0.1}  # fmt: skip
    assert on.to_dict()["lat_eps"] == 1.0 and on.to_dict()["sam_rho"] == 0.1
    # A run dir recorded before the fields existed resumes: missing = the default.
    explicit = {**off, "lat_eps": 0.0, "lat_steps": 4, "lat_layers": [], "sam_rho": 0.0}
    assert Checkpointer(tmp_path, off).config == Checkpointer(tmp_path, explicit).config
    assert Checkpointer(tmp_path, off).config != Checkpointer(tmp_path, on.to_dict()).config
    with pytest.raises(UsageError, match="--sam_rho is not supported with --distributed ddp"):
        build_run_config("npo", {**base, "sam_rho": 0.1, "distributed": "ddp"})
    with pytest.raises(UsageError, match="not supported with --distributed fsdp2"):
        build_run_config("npo", {**base, "lat_eps": 0.1, "distributed": "fsdp2"})
    build_run_config("npo", {**base, "lat_eps": 0.1, "distributed": "ddp"})  # LAT runs on DDP


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lat_eps", "0.5", "--lat_layers", "99"], "--lat_layers [99] outside the model's"),
        (["--lat_eps", "-1"], "--lat_eps must be a number >= 0"),
        (["--sam_rho", "nan"], "--sam_rho must be a number >= 0"),
        (["--lat_steps", "2"], "--lat_steps and --lat_layers apply only with --lat_eps > 0"),
    ],
)
def test_bad_modifier_flags_exit_2_before_loading(tiny_world, tmp_path, capsys, monkeypatch,
                                                  args, message):  # fmt: skip
    import transformers

    from unlearn.cli import main as cli

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before validation finished")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    out = tmp_path / "bad"
    rc = cli(["run", "--method", "npo", "--world", str(tiny_world.root), "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_lat_default_block_sits_below_what_the_methods_read():
    from unlearn.methods.rmu import rmu_layer
    from unlearn.training.modifiers.lat import default_lat_layers

    assert default_lat_layers(32) == [4] and default_lat_layers(3) == [0]
    assert default_lat_layers(1) == [0]
    assert all(default_lat_layers(n)[0] <= rmu_layer(n) for n in range(3, 81))
    assert StepModifier(StepModifiers(lat_eps=0.1), 3).describe() == {"lat_layers": [0]}
    assert StepModifier(StepModifiers(sam_rho=0.1), 3).describe() == {}


def test_a_lora_run_with_both_modifiers_records_them(tiny_world, tmp_path):
    """The recipe hands the modifier to the loop: LoRA (the reference is the trained module
    with adapters off), bf16 autocast, accumulation 2; run.json records the settings and the
    adversary's resolved blocks."""
    import json

    from unlearn.cli import main as cli

    out = tmp_path / "run"
    flags = ["--lora", "true", "--lat_eps", "0.5", "--lat_steps", "2", "--sam_rho", "0.05",
             "--mixed_precision", "bf16", "--max_steps", "2", "--pdbs", "2", "--grad_accum", "2",
             "--num_train_examples", "8", "--eval", "false", "--progress", "false"]  # fmt: skip
    rc = cli(["run", "--method", "npo", "--world", str(tiny_world.root), "--out", str(out), *flags])
    assert rc == 0
    meta = json.loads((out / "run.json").read_text())
    config = meta["config"]
    assert (config["lat_eps"], config["lat_steps"], config["sam_rho"]) == (0.5, 2, 0.05)
    assert config["lat_layers"] == [0]
    assert all(math.isfinite(v) for v in meta["final"].values())
    # Above (2/β) log 2: the forget term was computed under the adversary's perturbation.
    assert meta["final"]["forget"] > 2 / 0.1 * math.log(2)


def _with_lat(objective, par):
    objective.step_modifier = build_modifier(StepModifiers(lat_eps=0.5, lat_steps=2), 4)
    return objective


def test_lat_under_ddp_two_processes_equal_one_process(tmp_path):
    """The adversary's forwards and gradients are each rank's own and touch no parameter
    gradient, so DDP's synchronisation sees only the perturbed loss (CPU/gloo)."""
    from training.test_distributed import (
        LOSS_TOLERANCE,
        WEIGHT_TOLERANCE,
        _max_differences,
        _spawn,
        _train_tiny,
    )

    one, two, plain = tmp_path / "one", tmp_path / "two", tmp_path / "plain"
    _train_tiny(0, 1, "none", accum=4, lora=False, out=str(one), wrap_objective=_with_lat)
    _spawn("ddp", accum=2, lora=False, out=two, method="sequential",
           options={"wrap_objective": _with_lat})  # fmt: skip
    loss_diff, weight_diff = _max_differences(one, two)
    assert loss_diff < LOSS_TOLERANCE and weight_diff < WEIGHT_TOLERANCE, (loss_diff, weight_diff)
    _train_tiny(0, 1, "none", accum=4, lora=False, out=str(plain))
    assert _max_differences(one, plain)[1] > 1e-3  # LAT did change the run
