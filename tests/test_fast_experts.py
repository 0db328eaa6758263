"""The fast expert paths (grouped and padded layouts, custom autograd functions) against a plain per-token reference.

Outputs and gradients with respect to the tokens, every expert weight and the router, on random routings that leave
some experts empty and drop some tokens entirely.
"""

import pytest
import torch
from conftest import tiny_config
from torch import nn

from hf_switch.experts import Dispatch, SwitchExperts, group_by_expert
from hf_switch.modeling_switch import SwitchSparseMLP

LAYOUTS = ["grouped", "fused_grouped", "padded", "auto"]
ACTIVATIONS = ["relu", "gated-gelu"]


def reference_moe(experts: SwitchExperts, hidden, expert_index, expert_weight, kept):
    """`sum_j kept * weight * FFN_{expert_j}(token)` for each token, expert by expert with masks, no grouping."""
    output = torch.zeros_like(hidden)
    for expert in range(experts.num_experts):
        tokens, choice = torch.nonzero((expert_index == expert) & kept, as_tuple=True)
        rows = hidden[tokens]
        if experts.is_gated:
            inner = experts.act(rows @ experts.wi_0[expert].T) * (rows @ experts.wi_1[expert].T)
        else:
            inner = experts.act(rows @ experts.wi[expert].T)
        output = output.index_add(0, tokens, (inner @ experts.wo[expert].T) * expert_weight[tokens, choice, None])
    return output


def random_routing(num_tokens, num_experts, top_k, generator):
    """Top-k choices among half of the experts (the rest stay empty), with a third of the tokens fully dropped."""
    used = torch.randperm(num_experts, generator=generator)[: num_experts // 2]
    choices = torch.stack([used[torch.randperm(len(used), generator=generator)[:top_k]] for _ in range(num_tokens)])
    kept = torch.rand(num_tokens, top_k, generator=generator) < 0.8
    kept[torch.rand(num_tokens, generator=generator) < 1 / 3] = False
    return choices, kept


def gradients(output, tensors, generator):
    upstream = torch.randn(output.shape, generator=generator)
    return torch.autograd.grad(output, tensors, upstream, retain_graph=True)


def make_experts(feed_forward_proj, num_experts, seed=0):
    torch.manual_seed(seed)
    experts = SwitchExperts(tiny_config(num_experts=num_experts, feed_forward_proj=feed_forward_proj))
    for parameter in experts.parameters():
        nn.init.normal_(parameter, std=0.3)
    return experts


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("feed_forward_proj", ACTIVATIONS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_dispatch_experts_combine_match_reference(layout, feed_forward_proj, top_k):
    num_tokens, num_experts = 40, 8
    generator = torch.Generator().manual_seed(top_k)
    experts = make_experts(feed_forward_proj, num_experts)
    experts.layout = layout
    hidden = torch.randn(num_tokens, experts.wo.shape[1], generator=generator, requires_grad=True)
    expert_index, kept = random_routing(num_tokens, num_experts, top_k, generator)
    expert_weight = torch.rand(num_tokens, top_k, generator=generator, requires_grad=True)

    dispatch = group_by_expert(expert_index, expert_weight, kept, num_experts)
    assert (dispatch.tokens_per_expert == 0).sum() >= num_experts // 2
    output = experts(hidden, dispatch)
    expected = reference_moe(experts, hidden, expert_index, expert_weight, kept)

    dropped = ~kept.any(dim=1)
    assert dropped.any()
    assert torch.equal(output[dropped], torch.zeros_like(output[dropped]))
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    tensors = [hidden, expert_weight, *experts.parameters()]
    for got, want in zip(
        gradients(output, tensors, torch.Generator().manual_seed(3)),
        gradients(expected, tensors, torch.Generator().manual_seed(3)),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_experts_without_any_token(layout):
    experts = make_experts("relu", num_experts=4)
    experts.layout = layout
    hidden = torch.zeros(3, experts.wo.shape[1], requires_grad=True)
    nothing = torch.zeros(0, dtype=torch.long)
    output = experts(
        hidden, Dispatch(token_ids=nothing, weights=None, tokens_per_expert=torch.zeros(4, dtype=torch.long))
    )
    assert torch.equal(output, torch.zeros_like(hidden))
    output.sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in experts.parameters())


def test_padding_rows_take_nothing_from_the_token_they_gather():
    # Padding rows of the padded layout gather the first pair's token (and weight) and are then zeroed. Expert 3
    # overflows on any non-zero row: only its real token, a zero one, may reach it, or the first pair's token gets inf.
    experts = make_experts("relu", num_experts=4)
    experts.layout = "padded"
    with torch.no_grad():
        experts.wi[3] *= 1e38
    hidden = torch.randn(6, experts.wo.shape[1])
    hidden[5] = 0.0
    hidden.requires_grad_(True)
    dispatch = Dispatch(torch.tensor([1, 2, 3, 4, 5]), torch.ones(5), torch.tensor([3, 1, 0, 1]))
    output = experts(hidden, dispatch)
    assert output.isfinite().all()
    assert torch.equal(output[0], torch.zeros_like(output[0])) and torch.equal(output[5], torch.zeros_like(output[5]))
    output.sum().backward()
    assert hidden.grad.isfinite().all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("feed_forward_proj", ACTIVATIONS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_layer_matches_reference_including_router_gradient(layout, feed_forward_proj, top_k):
    config = tiny_config(
        num_experts=8,
        feed_forward_proj=feed_forward_proj,
        router_top_k=top_k,
        capacity_factor=0.5,
        min_expert_capacity=1,
    )
    torch.manual_seed(0)
    layer = SwitchSparseMLP(config).train()
    for parameter in layer.parameters():
        nn.init.normal_(parameter, std=0.3)
    layer.experts.layout = layout
    hidden = torch.randn(3, 12, config.d_model, requires_grad=True)
    output, decision = layer(hidden, torch.ones(3, 12, dtype=torch.bool))
    assert not decision.kept.all()

    flat = hidden.reshape(-1, config.d_model)
    expected = reference_moe(
        layer.experts,
        flat,
        decision.expert_index.reshape(-1, top_k),
        decision.expert_weight.reshape(-1, top_k),
        decision.kept.reshape(-1, top_k),
    ).reshape_as(hidden)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    tensors = [hidden, *layer.parameters()]
    for got, want in zip(
        gradients(output, tensors, torch.Generator().manual_seed(3)),
        gradients(expected, tensors, torch.Generator().manual_seed(3)),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _backward(experts, hidden, tokens_per_expert, upstream) -> tuple[dict, dict]:
    """Copies of the expert weight gradients after one more backward pass, and where those gradients live."""
    in_order = Dispatch(torch.arange(hidden.shape[0]), None, tokens_per_expert)
    experts(hidden, in_order).backward(upstream)
    parameters = dict(experts.named_parameters())
    return (
        {name: parameter.grad.clone() for name, parameter in parameters.items()},
        {name: parameter.grad.data_ptr() for name, parameter in parameters.items()},
    )


@pytest.mark.parametrize("layout", ["grouped", "padded"])
def test_gradient_memory_is_reused_only_once_nothing_refers_to_it(layout):
    """Expert weight gradients are written into memory kept between steps (fresh large allocations are page-faulted
    every step), never into a gradient still in use: accumulation and zero_grad(set_to_none=False) stay exact."""
    experts = make_experts("gated-gelu", 4)
    experts.layout = layout
    generator = torch.Generator().manual_seed(0)
    tokens_per_expert = torch.tensor([3, 0, 5, 2])
    hidden = [torch.randn(10, 16, generator=generator) for _ in range(2)]
    upstream = [torch.randn(10, 16, generator=generator) for _ in range(2)]
    first, _ = _backward(experts, hidden[0], tokens_per_expert, upstream[0])

    # Accumulation: the second pass must not write into the first pass's gradient.
    accumulated, _ = _backward(experts, hidden[1], tokens_per_expert, upstream[1])
    experts.zero_grad(set_to_none=True)
    second, addresses = _backward(experts, hidden[1], tokens_per_expert, upstream[1])
    for name in first:
        torch.testing.assert_close(accumulated[name], first[name] + second[name], rtol=1e-6, atol=1e-6)

    # Dropped gradients: the same memory comes back, holding exactly the new values.
    experts.zero_grad(set_to_none=True)
    again, again_addresses = _backward(experts, hidden[0], tokens_per_expert, upstream[0])
    assert again_addresses == addresses
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)

    # Zeroed in place: the kept gradient is accumulated into, not written over.
    experts.zero_grad(set_to_none=False)
    zeroed, _ = _backward(experts, hidden[1], tokens_per_expert, upstream[1])
    for name in first:
        torch.testing.assert_close(zeroed[name], second[name], rtol=1e-6, atol=1e-6)

    experts.eval()
    assert all(memory.buffer is None for memory in experts.gradient_memory.values())
