import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPTNeoXForCausalLM

from tiny_models import tiny_gpt_neox
from unlearn.errors import UsageError
from unlearn.training.optim import build_optimizer, describe_routing

BLOCK_MATRICES = (
    "attention.query_key_value.weight",
    "attention.dense.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)


def tiny_model() -> GPTNeoXForCausalLM:
    return tiny_gpt_neox(4).train()


def tiny_lora():
    return get_peft_model(tiny_model(), LoraConfig(r=4, target_modules="all-linear"))


def loss_of(model) -> torch.Tensor:
    ids = torch.arange(24).reshape(2, 12) % 64
    return model(input_ids=ids, labels=ids).loss


def train_step(model, opt) -> None:
    opt.zero_grad()
    loss_of(model).backward()
    opt.step()


def test_muon_routing_full_model():
    routing = describe_routing(tiny_model(), "muon")
    expected_muon = {f"gpt_neox.layers.{i}.{m}" for i in range(4) for m in BLOCK_MATRICES}
    assert set(routing["muon"]["names"]) == expected_muon
    adamw = set(routing["adamw"]["names"])
    assert {"gpt_neox.embed_in.weight", "lm_head.weight"} <= adamw
    assert "gpt_neox.final_layer_norm.weight" in adamw
    assert "gpt_neox.layers.0.attention.query_key_value.bias" in adamw
    assert "gpt_neox.layers.3.input_layernorm.weight" in adamw
    # Every parameter is routed exactly once.
    n_params = len(list(tiny_model().parameters()))
    assert routing["muon"]["tensors"] + routing["adamw"]["tensors"] == n_params
    assert not expected_muon & adamw


def test_muon_routing_lora_model():
    routing = describe_routing(tiny_lora(), "muon")
    muon = routing["muon"]["names"]
    assert len(muon) == 4 * 4 * 2  # 4 blocks x 4 linear layers x (lora_A, lora_B)
    assert all(".lora_A." in n or ".lora_B." in n for n in muon)
    assert all(".layers." in n for n in muon)
    # Frozen base weights, embeddings, norms and biases go nowhere.
    assert routing["adamw"]["tensors"] == 0


def test_adamw_routing_takes_every_trainable_parameter():
    model = tiny_lora()
    routing = describe_routing(model, "adamw")
    assert set(routing) == {"adamw"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert routing["adamw"]["names"] == trainable


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_step_changes_every_trainable_tensor(name):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, name, lr=1e-2)
    train_step(model, opt)
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_lora_step_changes_adapters_only(name):
    model = tiny_lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, name, lr=1e-2)
    # lora_B starts at zero, so lora_A gets no gradient until the second step.
    train_step(model, opt)
    train_step(model, opt)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n


def test_groups_are_tagged_and_lr_is_settable():
    model = tiny_model()
    opt = build_optimizer(model, "muon", lr=3e-3, weight_decay=0.1)
    groups = opt.param_groups
    assert sorted({g["optimizer"] for g in groups}) == ["adamw", "muon"]
    assert all(g["base_lr"] == 3e-3 for g in groups)
    # Weight decay only on matrices: the AdamW group of 1-D tensors has none.
    for g in groups:
        assert g["weight_decay"] == (0.1 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
    # The trainer's LR schedule writes group["lr"]; lr 0 must freeze everything.
    for g in groups:
        g["lr"] = g["base_lr"] * 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_state_dict_round_trip_resumes_exactly(name):
    model = tiny_model()
    opt = build_optimizer(model, name, lr=1e-2, weight_decay=0.01)
    train_step(model, opt)
    train_step(model, opt)
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(resumed_model, name, lr=1e-2, weight_decay=0.01)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    train_step(model, opt)
    train_step(resumed_model, resumed)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_resume_with_other_optimizer_is_usage_error():
    state = build_optimizer(tiny_model(), "adamw", lr=1e-3).state_dict()
    with pytest.raises(UsageError, match="resume"):
        build_optimizer(tiny_model(), "muon", lr=1e-3).load_state_dict(state)


def test_unknown_optimizer_is_usage_error():
    with pytest.raises(UsageError, match="unknown optimizer 'sgd'"):
        build_optimizer(tiny_model(), "sgd", lr=1e-3)


def test_no_trainable_parameters_is_usage_error():
    model = tiny_model().requires_grad_(False)
    with pytest.raises(UsageError, match="no trainable"):
        build_optimizer(model, "muon", lr=1e-3)


# -- separate learning rates: --muon_lr, --adam_lr ---------------------------------------------


def _base_lrs(opt) -> dict[str, set[float]]:
    out: dict[str, set[float]] = {}
    for g in opt.param_groups:
        out.setdefault(g["optimizer"], set()).add(g["base_lr"])
    return out


@pytest.mark.parametrize(
    ("name", "muon_lr", "adam_lr", "expected"),
    [
        ("muon", None, None, {"muon": {1e-3}, "adamw": {1e-3}}),
        ("muon", 2e-2, None, {"muon": {2e-2}, "adamw": {1e-3}}),
        ("muon", None, 3e-4, {"muon": {1e-3}, "adamw": {3e-4}}),
        ("muon", 2e-2, 3e-4, {"muon": {2e-2}, "adamw": {3e-4}}),
        ("adamw", None, 3e-4, {"adamw": {3e-4}}),
    ],
)
def test_each_optimizer_gets_its_own_base_lr(name, muon_lr, adam_lr, expected):
    opt = build_optimizer(tiny_model(), name, lr=1e-3, muon_lr=muon_lr, adam_lr=adam_lr)
    assert _base_lrs(opt) == expected
    assert all(g["lr"] == g["base_lr"] for g in opt.param_groups)
    if name == "muon":
        # --lr alone: Muon's step is matched to AdamW's; its own rate is on Muon's scale.
        (muon_group,) = opt.optimizers["muon"].param_groups
        assert muon_group["adjust_lr_fn"] == ("original" if muon_lr else "match_rms_adamw")


def test_bad_learning_rates_are_usage_errors():
    from unlearn.config.settings import TrainConfig

    for field in ("muon_lr", "adam_lr"):
        for bad in (0.0, -1e-3, float("nan"), float("inf")):
            with pytest.raises(UsageError, match=f"--{field} must be > 0"):
                TrainConfig(optimizer="muon", **{field: bad})
    with pytest.raises(UsageError) as e:
        TrainConfig(muon_lr=1e-3)  # the default optimizer is adamw
    assert str(e.value) == "--muon_lr applies to --optimizer muon only"
    assert TrainConfig(adam_lr=3e-4).adam_lr == 3e-4  # --adam_lr with adamw replaces --lr
    with pytest.raises(UsageError, match="muon_lr applies to the muon optimizer only"):
        build_optimizer(tiny_model(), "adamw", lr=1e-3, muon_lr=1e-3)
    with pytest.raises(UsageError, match="adam_lr must be > 0"):
        build_optimizer(tiny_model(), "muon", lr=1e-3, adam_lr=0.0)


def test_learning_rates_reach_run_configs_and_point_ids():
    from unlearn.recipes.unlearning import build_run_config
    from unlearn.sweep.points import point_id

    values = {"out": "o", "world": "w", "optimizer": "muon", "muon_lr": 0.02, "adam_lr": 3e-4}
    config = build_run_config("lens", values).to_dict()  # also what checkpoints compare
    assert (config["muon_lr"], config["adam_lr"], config["lr"]) == (0.02, 3e-4, 3e-3)
    assert build_run_config("lens", {"out": "o", "world": "w"}).to_dict()["muon_lr"] is None
    pid = point_id("lens", values, {"muon_lr": 0.02, "adam_lr": 3e-4}, "w")
    assert pid.startswith("lens-muon_lr0.02-adam_lr0.0003-")


def test_schedule_scales_each_group_from_its_own_base(monkeypatch):
    """A short full fine-tuning run with Muon at its own rate and AdamW at another: warmup and
    decay multiply each group's base, and both rates are logged."""
    import unlearn.training.loop
    from unlearn.config.settings import TrainConfig
    from unlearn.data.batching import ExampleStream
    from unlearn.methods.base import Reference
    from unlearn.methods.sequential import Sequential, SequentialConfig
    from unlearn.training.loop import make_plan, train
    from unlearn.training.schedules import lr_mult_at

    built = []

    def spy(*args, **kwargs):
        built.append(build_optimizer(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(unlearn.training.loop, "build_optimizer", spy)
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = Sequential(SequentialConfig(layers=[2]))
    method.setup(model, env=None)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 64, (12,), generator=g).tolist() for _ in range(8)]
    cfg = TrainConfig(
        optimizer="muon", lr=1e-3, muon_lr=2e-2, adam_lr=3e-4, num_train_examples=8, pdbs=2,
        grad_accum=1, max_steps=4, warmup=0.5, lr_decay="linear",
    )  # fmt: skip
    seen = []

    def on_log(step, values):  # called after the step, before the next one resets the rates
        seen.append((values, {g["optimizer"]: g["lr"] for g in built[0].param_groups}))

    plan = make_plan(cfg, 8, method.phases)
    reference = Reference(model, copy.deepcopy(model))
    streams = ExampleStream(docs, 2, 0, 0), ExampleStream(docs, 2, 0, 1)
    train(model, method, reference, *streams, cfg, plan, on_log=on_log, progress=False)
    mults = [lr_mult_at(s, 4, 2, "linear") for s in range(4)]
    assert len(set(mults)) > 2  # warmup then decay: the multiplier really varies
    for (values, lrs), mult in zip(seen, mults, strict=True):
        assert lrs["muon"] == pytest.approx(2e-2 * mult)
        assert lrs["adamw"] == pytest.approx(3e-4 * mult)
        assert values["muon_lr"] == pytest.approx(2e-2 * mult)
        assert values["lr"] == pytest.approx(3e-4 * mult)  # AdamW's rate, as with --lr alone
    # Both optimizers moved their tensors (the blocks up to the target layer get gradients).
    routing = describe_routing(model, "muon")
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "gpt_neox.layers.0.attention.dense.weight" in moved & set(routing["muon"]["names"])
    assert "gpt_neox.layers.0.attention.dense.bias" in moved & set(routing["adamw"]["names"])
