"""Mixed precision: bf16 autocast trains like float32 within a stated tolerance, keeps float32
master weights (an update below bf16's resolution survives), fp16 runs with a gradient scaler
whose state resumes, and bad combinations are refused before any weight loads."""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_gpt_neox
from unlearn.cli import main as cli
from unlearn.config.settings import TrainConfig
from unlearn.data.batching import ExampleStream
from unlearn.errors import UsageError
from unlearn.objectives import get_objective
from unlearn.training.frozen_cache import frozen_key
from unlearn.training.loop import TrainState, make_plan, train

STEPS = 20
BF16_LOSS_TOLERANCE = 0.02
"""Largest relative difference of a logged loss between bf16 autocast and float32 over 20 steps
of the tiny model at lr 1e-3 (measured: 0.007%; bench/memory.py measures it on a 100M model)."""


def _stream(seed: int) -> ExampleStream:
    g = torch.Generator().manual_seed(seed)
    examples = [torch.randint(1, 64, (n,), generator=g).tolist() for n in range(6, 22)]
    return ExampleStream(examples, 4, 0, seed=seed)


def _train(mixed_precision: str, steps: int = STEPS, lr: float = 1e-3, state=None):
    model = tiny_gpt_neox(4, seed=0).requires_grad_(True)
    cfg = TrainConfig(lr=lr, pdbs=4, grad_accum=1, max_steps=steps,
                      mixed_precision=mixed_precision, grad_clip=0.0)  # fmt: skip
    objective = get_objective("language_modeling")()
    rows: list[dict] = []
    plan = make_plan(cfg, 16, objective.phases, 1)
    state = train(model, objective, None, _stream(1), None, cfg, plan, state=state,
                  on_log=lambda step, v: rows.append(v), progress=False)  # fmt: skip
    return model, rows, state


def test_bf16_autocast_trains_within_tolerance_of_float32():
    _, fp32, _ = _train("no")
    _, bf16, _ = _train("bf16")
    assert fp32[-1]["lm"] < 0.95 * fp32[0]["lm"]  # both really train
    assert bf16[-1]["lm"] < 0.95 * bf16[0]["lm"]
    worst = max(abs(b["lm"] - f["lm"]) / f["lm"] for b, f in zip(bf16, fp32, strict=True))
    assert 0 < worst < BF16_LOSS_TOLERANCE, worst  # > 0: autocast really computed in bf16


def test_an_update_below_bf16_resolution_survives_in_the_master_weights():
    before = tiny_gpt_neox(4, seed=0).state_dict()
    model, _, _ = _train("bf16", steps=1, lr=1e-6)  # Adam's first step moves each weight ~lr
    changed = 0
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        delta = (p.detach() - before[name]).abs()
        lost_in_bf16 = p.detach().bfloat16() == before[name].bfloat16()
        changed += int(((delta > 0) & lost_in_bf16).sum())
    assert changed > 1000  # moved in float32, invisible if the weights were stored in bf16


def test_fp16_trains_with_a_gradient_scaler_whose_state_is_kept():
    _, rows, state = _train("fp16", steps=4)
    assert all(torch.isfinite(torch.tensor(r["lm"])) for r in rows)
    assert state.scaler is not None and state.scaler["scale"] > 0
    # A resumed run starts from the saved scale, not the default one.
    resumed = TrainState(step=0, scaler={**state.scaler, "scale": 1024.0})
    _, _, after = _train("fp16", steps=1, state=resumed)
    assert after.scaler["scale"] == 1024.0


def test_bad_mixed_precision_settings_are_refused():
    with pytest.raises(UsageError, match="needs --dtype float32"):
        TrainConfig(mixed_precision="fp16", dtype="bfloat16")
    with pytest.raises(UsageError, match="unknown mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(UsageError, match="use bf16"):
        TrainConfig(mixed_precision="fp16", distributed="fsdp2")


def test_bad_mixed_precision_flag_is_one_line_before_the_run_dir_exists(
    tiny_world, tmp_path, capsys
):
    out = tmp_path / "r"
    argv = ["run", "--world", str(tiny_world.root), "--out", str(out)]
    rc = cli([*argv, "--mixed_precision", "fp16", "--dtype", "bfloat16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs --dtype float32" in err[0]
    assert not out.exists()


def test_frozen_outputs_under_autocast_are_cached_apart():
    class Ref:
        def cache_key(self):
            return {"name": "m"}

    plain = frozen_key(Ref(), "float32", "cpu")
    assert "mixed_precision" not in plain  # keys of runs without it are unchanged
    assert frozen_key(Ref(), "float32", "cpu", "bf16") == {**plain, "mixed_precision": "bf16"}
