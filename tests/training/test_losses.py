"""Hand-computed values for the shared loss terms, masking, and where gradients flow."""

from __future__ import annotations

import math

import pytest
import torch

from unlearn.training.losses import (
    activation_mse,
    kl_retain,
    l2_retain,
    lm_ce,
    masked_mean,
    max_entropy,
    random_target_ce,
)

LN = math.log


def close(actual: torch.Tensor, expected: float, tol: float = 1e-6) -> None:
    assert actual.dim() == 0
    assert actual.dtype == torch.float32
    assert abs(actual.item() - expected) < tol, (actual.item(), expected)


# ---- masked_mean ------------------------------------------------------------------------------


def test_masked_mean_is_a_token_mean_over_valid_positions():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(values, mask), (1 + 2 + 4) / 3)
    close(masked_mean(values, mask.bool()), (1 + 2 + 4) / 3)


def test_masked_mean_ignores_even_non_finite_padding():
    values = torch.tensor([[1.0, float("nan"), float("inf")]])
    close(masked_mean(values, torch.tensor([[True, False, False]])), 1.0)


def test_masked_mean_rejects_empty_and_misshaped_masks():
    with pytest.raises(ValueError, match="no valid tokens"):
        masked_mean(torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        masked_mean(torch.ones(2, 3), torch.ones(3, 2))


# ---- forget CE terms --------------------------------------------------------------------------

# Position 0 is uniform over 3 tokens; position 1 has probabilities (1/6, 1/6, 4/6).
PEAKED = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, LN(4.0)]]])
PEAKED_ME = (LN(6.0) - LN(4.0) / 3) / LN(3.0)  # (logsumexp - mean) / log V at position 1


def test_max_entropy_hand_value_and_padding():
    close(max_entropy(PEAKED, torch.ones(1, 2)), (1.0 + PEAKED_ME) / 2)
    # A third, padded position with very confident logits must not move the result.
    padded = torch.cat([PEAKED, torch.tensor([[[50.0, -50.0, 0.0]]])], dim=1)
    close(max_entropy(padded, torch.tensor([[1, 1, 0]])), (1.0 + PEAKED_ME) / 2)


def test_max_entropy_is_exactly_one_at_uniform_and_above_otherwise():
    uniform = torch.full((2, 3, 7), 5.0)
    close(max_entropy(uniform, torch.ones(2, 3)), 1.0)
    close(max_entropy(PEAKED[:, 1:], torch.ones(1, 1)), PEAKED_ME)
    assert PEAKED_ME > 1.0


def test_random_target_ce_matches_hand_computation_with_fixed_generator():
    # The same seed draws the same targets; the CE itself is computed by hand.
    targets = torch.randint(3, (1, 2), generator=torch.Generator().manual_seed(7))
    probs = [[1 / 3, 1 / 3, 1 / 3], [1 / 6, 1 / 6, 4 / 6]]
    expected = sum(-LN(probs[t][int(targets[0, t])]) for t in range(2)) / 2 / LN(3.0)
    value = random_target_ce(PEAKED, torch.ones(1, 2), generator=torch.Generator().manual_seed(7))
    close(value, expected)


def test_random_target_ce_padding_and_uniform_value():
    mask = torch.tensor([[1, 0]])
    # Only the uniform position is valid: CE is log 3 whatever the target, so exactly 1.
    close(random_target_ce(PEAKED, mask, generator=torch.Generator().manual_seed(0)), 1.0)


def test_random_target_ce_estimates_max_entropy():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 3.0]).expand(1, 20000, 5)
    mask = torch.ones(1, 20000)
    estimate = random_target_ce(logits, mask, generator=torch.Generator().manual_seed(1))
    exact = max_entropy(logits, mask)
    assert exact.item() > 1.2
    assert abs(estimate.item() - exact.item()) < 0.02


# ---- KL retain --------------------------------------------------------------------------------


def test_kl_retain_hand_value_and_padding():
    ref = torch.tensor([[[0.0, 0.0], [9.0, -9.0]]])  # position 1 is padding
    cur = torch.tensor([[[0.0, LN(3.0)], [-9.0, 9.0]]])  # (1/4, 3/4)
    expected = 0.5 * LN(0.5 / 0.25) + 0.5 * LN(0.5 / 0.75)
    close(kl_retain(ref, cur, torch.tensor([[True, False]])), expected)


def test_kl_retain_of_identical_distributions_is_zero():
    logits = torch.randn(2, 4, 11, generator=torch.Generator().manual_seed(0))
    close(kl_retain(logits, logits + 3.0, torch.ones(2, 4)), 0.0)


def test_kl_retain_gradient_reaches_current_only():
    ref = torch.randn(1, 3, 5, requires_grad=True)
    cur = torch.randn(1, 3, 5, requires_grad=True)
    kl_retain(ref, cur, torch.tensor([[1, 1, 0]])).backward()
    assert ref.grad is None
    assert cur.grad is not None and cur.grad[0, :2].abs().sum() > 0
    assert torch.all(cur.grad[0, 2] == 0)  # the padded position gets no gradient


def test_kl_retain_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        kl_retain(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))


# ---- hidden-state terms -----------------------------------------------------------------------


def test_l2_retain_is_the_norm_not_the_square():
    ref = [torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)]
    cur = [
        torch.tensor([[[3.0, 4.0], [0.0, 0.0], [100.0, 0.0]]]),  # norms 5, 0, (pad)
        torch.tensor([[[6.0, 8.0], [0.0, 0.0], [0.0, 100.0]]]),  # norms 10, 0, (pad)
    ]
    mask = torch.tensor([[1, 1, 0]])
    close(l2_retain(ref, cur, mask), ((5 + 0) / 2 + (10 + 0) / 2) / 2)


def test_l2_retain_gradient_is_finite_when_equal_to_reference():
    ref = torch.randn(1, 2, 4, requires_grad=True)
    cur = ref.detach().clone().requires_grad_(True)
    loss = l2_retain([ref], [cur], torch.ones(1, 2))
    loss.backward()
    close(loss, 0.0)
    assert ref.grad is None
    assert cur.grad is not None and torch.all(cur.grad == 0)


def test_activation_mse_hand_value_and_gradients():
    pred = [
        torch.tensor([[[1.0, 3.0], [7.0, 7.0]]], requires_grad=True),  # position 1 is padding
        torch.tensor([[[2.0, 0.0], [7.0, 7.0]]], requires_grad=True),
    ]
    target = [torch.zeros(1, 2, 2, requires_grad=True), torch.zeros(1, 2, 2, requires_grad=True)]
    loss = activation_mse(pred, target, torch.tensor([[1, 0]]))
    close(loss, ((1 + 9) / 2 + (4 + 0) / 2) / 2)
    loss.backward()
    assert all(t.grad is None for t in target)
    # d/dp of mean over 2 layers of mean over 2 dims of p^2 at the one valid token = p / 2.
    torch.testing.assert_close(pred[0].grad, torch.tensor([[[0.5, 1.5], [0.0, 0.0]]]))


def test_hidden_terms_reject_mismatched_layer_lists():
    with pytest.raises(ValueError, match="layers"):
        l2_retain([torch.zeros(1, 1, 2)], [], torch.ones(1, 1))
    with pytest.raises(ValueError, match="layers"):
        activation_mse([], [], torch.ones(1, 1))


# ---- LM CE ------------------------------------------------------------------------------------


def test_lm_ce_is_shifted_and_counts_only_pairs_of_valid_tokens():
    # Right padding: only the pair (token 0 -> token 1) is scored, predicted at position 0.
    logits = torch.tensor([[[0.0, LN(3.0)], [50.0, -50.0], [50.0, -50.0]]])
    input_ids = torch.tensor([[0, 1, 1]])
    close(lm_ce(logits, input_ids, torch.tensor([[1, 1, 0]])), LN(4.0 / 3.0))
    # Left padding: position 0 is a pad, so its prediction of token 1 is not scored either.
    both = torch.tensor([[[9.0, -9.0], [0.0, LN(3.0)], [0.0, 0.0]]])
    close(lm_ce(both, torch.tensor([[0, 0, 1]]), torch.tensor([[0, 1, 1]])), LN(4.0 / 3.0))


def test_lm_ce_gradient_and_shape_check():
    logits = torch.zeros(1, 3, 4, requires_grad=True)
    lm_ce(logits, torch.tensor([[1, 2, 3]]), torch.ones(1, 3)).backward()
    assert logits.grad is not None and torch.all(logits.grad[0, 2] == 0)  # last position unused
    with pytest.raises(ValueError, match="input_ids"):
        lm_ce(torch.zeros(1, 3, 4), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
