"""Block-output hooks: `replace_output` substitutes exactly block l's output, lets gradients reach
the substituted value, and never outlives its context; `capture` is removed likewise.
`run_above` gives replace_output's result without computing the blocks below; `get_blocks`
remembers the block list per model object and finds a replaced one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tiny_models import tiny_gpt_neox, tiny_llama
from unlearn.readouts.hooks import capture, get_blocks, project_out, replace_output, run_above

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


# ---- run_above: the blocks above `layer` only ----------------------------------------------

FAMILIES = {"gpt_neox": tiny_gpt_neox, "llama": tiny_llama}


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0  # right padding: the attention mask reaches the upper blocks
    return _ids(), mask


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
@pytest.mark.parametrize("layer", [0, 2, N - 1])
def test_run_above_equals_replace_output_values_and_gradients(family, layer):
    model = FAMILIES[family](N, initializer_range=0.2).requires_grad_(False)
    ids, mask = _padded_batch()
    g = torch.Generator().manual_seed(3)
    results = []
    for substitute in (replace_output, run_above):
        value = torch.randn(2, 10, 32, generator=g.manual_seed(3), requires_grad=True)
        with substitute(model, layer, value):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        (logits.square() * mask[..., None]).sum().backward()
        results.append((logits.detach(), value.grad))
    (full, full_grad), (above, above_grad) = results
    torch.testing.assert_close(above, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(above_grad, full_grad, rtol=1e-6, atol=1e-6)


def _count_calls(modules: list[nn.Module]) -> tuple[list[int], list]:
    calls = [0]
    handles = [
        m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in modules
    ]
    return calls, handles


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_run_above_computes_no_block_below_and_restores_the_forwards(family):
    model = FAMILIES[family](N)
    blocks, layer = get_blocks(model), 2
    # The blocks' insides (attention, MLP, norms) run only when a block really computes.
    lower, lower_handles = _count_calls([m for b in blocks[: layer + 1] for m in b.children()])
    upper, upper_handles = _count_calls([m for b in blocks[layer + 1 :] for m in b.children()])
    value = torch.zeros(2, 10, 32)
    with torch.no_grad(), run_above(model, layer, value):
        # The first call of a block class runs one block once, to learn its output format.
        model(input_ids=_ids(), use_cache=False)
        assert lower[0] <= len(list(blocks[0].children()))
        lower[0], upper[0] = 0, 0
        model(input_ids=_ids(), use_cache=False)
    assert lower == [0] and upper[0] > 0
    for h in lower_handles + upper_handles:
        h.remove()
    assert all("forward" not in vars(b) for b in blocks)  # the class forwards again
    with pytest.raises(RuntimeError, match="boom"), run_above(model, 1, value):
        raise RuntimeError("boom")
    assert all("forward" not in vars(b) for b in blocks)
    with pytest.raises(IndexError):
        run_above(model, N, value).__enter__()


def test_run_above_restores_an_instance_level_forward():
    """A forward set on the instance (accelerate's hooks do this) is put back as it was."""
    model = tiny_gpt_neox(N)
    block = get_blocks(model)[0]
    own = block.forward
    block.forward = own  # an instance attribute now, like a patched forward
    with run_above(model, 1, torch.zeros(2, 10, 32)):
        assert block.forward is not own
    assert vars(block)["forward"] is own


class _TupleBlock(nn.Module):
    """A block in the format of transformers < 5: its output is a tuple (hidden,)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, hidden: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor]:
        return (hidden + scale * torch.tanh(self.linear(hidden)),)


class _TupleModel(nn.Module):
    def __init__(self, d: int = 8, n: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_TupleBlock(d) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x, scale=0.5)[0]
        return self.head(x)


def test_run_above_keeps_the_tuple_output_format_of_older_blocks():
    torch.manual_seed(0)
    model = _TupleModel()
    x, value = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        with replace_output(model, 1, value):
            expected = model(x)
        with run_above(model, 1, value):
            got = model(x)
    torch.testing.assert_close(got, expected)


# ---- get_blocks: remembered per model object -----------------------------------------------


def test_get_blocks_is_remembered_and_follows_a_replaced_block_list():
    model = tiny_gpt_neox(N)
    blocks = get_blocks(model)
    assert get_blocks(model) is blocks is model.gpt_neox.layers
    model.gpt_neox.layers = nn.ModuleList(list(blocks)[:2])  # a new list at the same path
    assert get_blocks(model) is model.gpt_neox.layers and len(get_blocks(model)) == 2
    del model.gpt_neox.layers  # the remembered path is gone: searched again
    model.gpt_neox.blocks = nn.ModuleList(list(blocks))
    assert get_blocks(model) is model.gpt_neox.blocks


def test_get_blocks_through_a_wrapper_is_the_wrapped_models_list():
    from unlearn.config.settings import LoraSettings
    from unlearn.models.lora import attach_lora

    model = tiny_gpt_neox(N)
    blocks = get_blocks(model)  # remembered before wrapping
    wrapped = attach_lora(model, LoraSettings(lora_r=2))
    assert get_blocks(wrapped) is blocks is get_blocks(model)
    outer = nn.Sequential(wrapped)  # a DDP-like wrapper is another object, same list
    assert get_blocks(outer) is blocks


# ---- project_out: directional ablation at block outputs ---------------------------------------


def test_project_out_removes_the_direction_where_asked_and_nowhere_else():
    """Block 1's output loses its component along d (of any length), block 0's is untouched,
    and the model's logits are those of substituting the projected output by hand; the hooks
    are gone after the context, also when the forward raises."""
    model = tiny_gpt_neox(N)
    ids = _ids()
    d = torch.randn(32, generator=torch.Generator().manual_seed(2)) * 3.0
    u = d / d.norm()
    with torch.no_grad():
        with capture(model, [0, 1]) as plain:
            plain_logits = model(ids).logits
        plain = dict(plain)
        with project_out(model, {1: d}), capture(model, [0, 1]) as seen:
            logits = model(ids).logits
        projected = plain[1] - (plain[1] @ u)[..., None] * u
        with replace_output(model, 1, projected):
            expected = model(ids).logits
    torch.testing.assert_close(seen[0], plain[0])
    torch.testing.assert_close(seen[1] @ u, torch.zeros_like(seen[1] @ u), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, plain_logits)
    with pytest.raises(RuntimeError), project_out(model, {0: u, 2: u}):
        raise RuntimeError("forward failed")
    assert all(not block._forward_hooks for block in get_blocks(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain_logits)


def test_project_out_refuses_a_bad_layer_or_direction():
    model = tiny_gpt_neox(N)
    with pytest.raises(ValueError, match=r"0\.\.3"), project_out(model, {N: torch.ones(32)}):
        pass
    with pytest.raises(ValueError, match="non-zero"), project_out(model, {0: torch.zeros(32)}):
        pass
    assert all(not block._forward_hooks for block in get_blocks(model))
