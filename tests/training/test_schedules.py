import math

import pytest

from unlearn.errors import UsageError
from unlearn.training.schedules import forget_coef_at, lr_mult_at, retain_coef_at


def test_retain_ramp_start_middle_end():
    # 5 steps: progress 0, 0.5, 1 at steps 0, 2, 4.
    assert retain_coef_at(0, 5, coef=2.0, ramp_start=0.25) == pytest.approx(0.5)
    assert retain_coef_at(2, 5, coef=2.0, ramp_start=0.25) == pytest.approx(1.25)
    assert retain_coef_at(4, 5, coef=2.0, ramp_start=0.25) == pytest.approx(2.0)
    assert retain_coef_at(0, 5, coef=2.0, ramp_start=0.0) == 0.0
    assert retain_coef_at(1, 5, coef=2.0, ramp_start=1.0) == pytest.approx(2.0)


def test_forget_decay_start_middle_end():
    assert forget_coef_at(0, 5, coef=4.0) == pytest.approx(4.0)
    assert forget_coef_at(2, 5, coef=4.0) == pytest.approx(3.5)
    assert forget_coef_at(4, 5, coef=4.0) == pytest.approx(3.0)
    assert forget_coef_at(4, 5, coef=4.0, end_fraction=0.5) == pytest.approx(2.0)


def test_one_step_run_uses_nominal_coefficients():
    assert retain_coef_at(0, 1, coef=3.0, ramp_start=0.0) == 3.0
    assert forget_coef_at(0, 1, coef=3.0) == 3.0
    assert lr_mult_at(0, 1, warmup_steps=0, decay="linear") == 1.0
    assert lr_mult_at(0, 1, warmup_steps=0, decay="cosine") == 1.0


def test_lr_warmup_then_constant():
    mults = [lr_mult_at(s, 10, warmup_steps=3) for s in range(10)]
    assert mults[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert mults[4:] == [1.0] * 6


def test_lr_linear_decay():
    assert lr_mult_at(3, 10, warmup_steps=3, decay="linear") == pytest.approx(1.0)
    assert lr_mult_at(6, 10, warmup_steps=3, decay="linear") == pytest.approx(4 / 7)
    # The last step keeps a small non-zero learning rate.
    assert lr_mult_at(9, 10, warmup_steps=3, decay="linear") == pytest.approx(1 / 7)


def test_lr_cosine_decay():
    assert lr_mult_at(0, 10, warmup_steps=0, decay="cosine") == pytest.approx(1.0)
    assert lr_mult_at(6, 10, warmup_steps=2, decay="cosine") == pytest.approx(0.5)
    expected_last = 0.5 * (1 + math.cos(math.pi * 7 / 8))
    assert lr_mult_at(9, 10, warmup_steps=2, decay="cosine") == pytest.approx(expected_last)


@pytest.mark.parametrize(
    "call",
    [
        lambda: retain_coef_at(0, 5, coef=1.0, ramp_start=1.5),
        lambda: retain_coef_at(0, 5, coef=-1.0, ramp_start=0.0),
        lambda: forget_coef_at(0, 5, coef=1.0, end_fraction=-0.1),
        lambda: lr_mult_at(0, 5, warmup_steps=5),
        lambda: lr_mult_at(0, 5, warmup_steps=0, decay="exponential"),
        lambda: lr_mult_at(0, 0, warmup_steps=0),
    ],
)
def test_bad_values_are_usage_errors(call):
    with pytest.raises(UsageError):
        call()


def test_step_outside_run_is_a_bug():
    with pytest.raises(ValueError):
        retain_coef_at(5, 5, coef=1.0, ramp_start=0.0)
    with pytest.raises(ValueError):
        lr_mult_at(-1, 5, warmup_steps=0)
