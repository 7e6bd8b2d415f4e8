"""Block-output hooks: `replace_output` substitutes exactly block l's output, lets gradients reach
the substituted value, and never outlives its context; `capture` is removed likewise."""

from __future__ import annotations

import copy

import pytest
import torch

from tiny_models import tiny_gpt_neox
from unlearn.hooks import capture, get_blocks, replace_output

N = 4


def _ids() -> torch.Tensor:
    return torch.randint(64, (2, 10), generator=torch.Generator().manual_seed(0))


def _perturbed_below(model: torch.nn.Module, layer: int, seed: int = 1) -> torch.nn.Module:
    """A copy of `model` whose embeddings and blocks 0..layer differ; blocks above are shared."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lower = [other.gpt_neox.embed_in, *list(get_blocks(other))[: layer + 1]]
        for module in lower:
            for p in module.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return other


@pytest.mark.parametrize("layer", [0, 2])
def test_replacing_block_l_output_runs_only_the_blocks_above(layer):
    """Model A with block l's output replaced by model B's h_l gives B's logits when A and B
    share every block above l (and differ below): the substitution is at block l's *output*,
    so block l itself and everything under it no longer matter."""
    a = tiny_gpt_neox(N, initializer_range=0.2)
    b = _perturbed_below(a, layer)
    ids = _ids()
    with torch.no_grad(), capture(b, [layer]) as hs:
        expected = b(input_ids=ids).logits
    with torch.no_grad():
        own = a(input_ids=ids).logits
        with replace_output(a, layer, hs[layer]):
            got = a(input_ids=ids).logits
    assert not torch.allclose(own, expected, atol=1e-3)  # the test can tell A from B
    torch.testing.assert_close(got, expected)


def test_replacing_the_last_block_feeds_the_final_norm_and_unembedding():
    model = tiny_gpt_neox(N, initializer_range=0.2)
    value = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), replace_output(model, N - 1, value):
        logits = model(input_ids=_ids()).logits
    with torch.no_grad():
        norm = model.gpt_neox.final_layer_norm
        expected = model.get_output_embeddings()(norm(value))
    torch.testing.assert_close(logits, expected)


def test_gradients_flow_into_the_substituted_value_only():
    model = tiny_gpt_neox(N).requires_grad_(True)
    value = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    with replace_output(model, 1, value):
        model(input_ids=_ids()).logits.square().sum().backward()
    assert value.grad is not None and float(value.grad.abs().sum()) > 0
    blocks = get_blocks(model)
    # Blocks 0 and 1 computed an output that was thrown away: no gradient reaches them.
    for block in blocks[:2]:
        assert all(p.grad is None or not p.grad.any() for p in block.parameters())
    assert any(p.grad is not None and p.grad.any() for p in blocks[2].parameters())


def test_hooks_are_removed_after_the_context_even_when_the_forward_raises():
    model = tiny_gpt_neox(N)
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    value = torch.zeros(2, 10, 32)
    with pytest.raises(RuntimeError, match="boom"), replace_output(model, 2, value):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), capture(model, [1, 2]):
        raise RuntimeError("boom")
    assert all(not block._forward_hooks for block in get_blocks(model))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
