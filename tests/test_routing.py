"""Routing math against hand-computed cases."""

import math

import pytest
import torch
from conftest import tiny_config

from hf_switch.experts import combine, group_by_expert
from hf_switch.modeling_switch import SwitchLayerFF
from hf_switch.routing import (
    SwitchRouter,
    expert_capacity_per_position,
    expert_priority,
    load_balancing_loss,
    router_z_loss,
)


def test_priority_counts_each_experts_queue_in_position_order():
    expert_index = torch.tensor([[0, 0, 1, 0, 1, 1]])[:, :, None]
    mask = torch.ones(1, 6, dtype=torch.bool)
    assert expert_priority(expert_index, mask, 2).flatten().tolist() == [1, 2, 1, 3, 2, 3]
    # Masked tokens take no place; earlier (cached) counts shift the queue.
    mask[0, 1] = False
    past = torch.tensor([[2, 0]])
    assert expert_priority(expert_index, mask, 2, past).flatten().tolist() == [3, 0, 1, 4, 2, 3]


def test_top2_queues_are_in_position_then_choice_order():
    expert_index = torch.tensor([[[0, 1], [1, 0]]])
    priority = expert_priority(expert_index, torch.ones(1, 2, dtype=torch.bool), 2)
    assert priority.tolist() == [[[1, 1], [2, 2]]]


def test_capacity_from_factor_in_encoder_and_per_prefix_in_decoder():
    config = tiny_config(num_experts=4, capacity_factor=1.0, eval_capacity_factor=2.0, min_expert_capacity=1)
    mask = torch.ones(1, 8, dtype=torch.bool)
    encoder = expert_capacity_per_position(config, mask, training=True, causal=False)
    assert encoder.tolist() == [[2] * 8]
    assert expert_capacity_per_position(config, mask, training=False, causal=False).tolist() == [[4] * 8]
    decoder = expert_capacity_per_position(config, mask, training=True, causal=True)
    assert decoder.tolist() == [[math.ceil(t / 4) for t in range(1, 9)]]
    past = torch.tensor([4])
    cached = expert_capacity_per_position(config, mask[:, :1], training=True, causal=True, past_tokens=past)
    assert cached.tolist() == [[2]]


def test_absolute_capacity_wins_and_no_capacity_is_dropless():
    mask = torch.ones(2, 5, dtype=torch.bool)
    config = tiny_config(expert_capacity=3, capacity_factor=0.1)
    assert expert_capacity_per_position(config, mask, True, False).tolist() == [[3] * 5] * 2
    dropless = tiny_config(capacity_factor=None, eval_capacity_factor=None)
    assert expert_capacity_per_position(dropless, mask, True, False) is None
    assert expert_capacity_per_position(dropless, mask, False, True) is None


def test_load_balancing_loss_is_one_when_balanced_and_num_experts_when_collapsed():
    num_experts = 4
    uniform = torch.full((1, 8, num_experts), 1 / num_experts)
    balanced = torch.arange(8).remainder(num_experts).reshape(1, 8, 1)
    mask = torch.ones(1, 8, dtype=torch.bool)
    assert load_balancing_loss(uniform, balanced, mask).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(1, 8, num_experts)
    collapsed_probs[..., 0] = 1
    collapsed = torch.zeros(1, 8, 1, dtype=torch.long)
    assert load_balancing_loss(collapsed_probs, collapsed, mask).item() == pytest.approx(num_experts)


def test_router_losses_leave_out_masked_tokens():
    logits = torch.tensor([[[0.0, 0.0], [3.0, 1.0], [100.0, -100.0]]])
    mask = torch.tensor([[True, True, False]])
    expected = (math.log(2) ** 2 + math.log(math.exp(3) + math.exp(1)) ** 2) / 2
    assert router_z_loss(logits, mask).item() == pytest.approx(expected, rel=1e-6)
    probs = logits.softmax(-1)
    index = logits.argmax(-1, keepdim=True)
    fraction = torch.tensor([1.0, 0.0])
    mean_prob = probs[0, :2].mean(0)
    assert load_balancing_loss(probs, index, mask).item() == pytest.approx(2 * (fraction * mean_prob).sum().item())


def _router_choosing(experts: list[int], num_experts: int, **overrides):
    """A router and inputs whose top-1 choices are `experts`: one-hot inputs, identity-like classifier."""
    config = tiny_config(d_model=num_experts, num_experts=num_experts, **overrides)
    router = SwitchRouter(config).eval()
    with torch.no_grad():
        router.classifier.weight.copy_(torch.eye(num_experts) * 5)
    inputs = torch.nn.functional.one_hot(torch.tensor([experts]), num_experts).float()
    return router, inputs


def test_drop_counts_match_a_hand_computed_case():
    router, inputs = _router_choosing([0, 0, 0, 1, 0, 1], num_experts=2, expert_capacity=2)
    decision = router(inputs, torch.ones(1, 6, dtype=torch.bool))
    assert decision.expert_index.flatten().tolist() == [0, 0, 0, 1, 0, 1]
    assert decision.kept.flatten().tolist() == [True, True, False, True, False, True]


def test_dropped_tokens_pass_through_the_residual_unchanged():
    torch.manual_seed(0)
    config = tiny_config(num_experts=2, expert_capacity=1)
    layer = SwitchLayerFF(config, is_sparse=True).eval()
    hidden = torch.randn(1, 6, config.d_model)
    output, decision = layer(hidden, torch.ones(1, 6, dtype=torch.bool))
    dropped = ~decision.kept[0, :, 0]
    assert dropped.sum() >= 4
    assert torch.equal(output[0, dropped], hidden[0, dropped])
    assert not torch.allclose(output[0, ~dropped], hidden[0, ~dropped])


def test_ignored_padding_is_neither_routed_nor_counted():
    router, inputs = _router_choosing([0, 0, 0, 0], num_experts=2, expert_capacity=2, router_ignore_padding_tokens=True)
    mask = torch.tensor([[False, True, False, True]])
    decision = router(inputs, mask)
    assert decision.kept.flatten().tolist() == [False, True, False, True]


def test_group_and_combine_restore_token_order_with_weights():
    expert_index = torch.tensor([[2], [0], [2], [1]])
    weights = torch.tensor([[0.5], [1.0], [2.0], [3.0]])
    kept = torch.tensor([[True], [True], [False], [True]])
    dispatch = group_by_expert(expert_index, weights, kept, num_experts=3)
    assert dispatch.token_ids.tolist() == [1, 3, 0]
    assert dispatch.tokens_per_expert.tolist() == [1, 1, 1]
    outputs = torch.tensor([[10.0], [20.0], [30.0]])
    combined = combine(outputs, dispatch.token_ids, dispatch.weights, num_tokens=4)
    assert combined.flatten().tolist() == [15.0, 10.0, 0.0, 60.0]


def test_top2_weights_are_renormalised_and_both_experts_run():
    config = tiny_config(router_top_k=2, capacity_factor=None, eval_capacity_factor=None)
    router = SwitchRouter(config).eval()
    decision = router(torch.randn(2, 5, config.d_model), torch.ones(2, 5, dtype=torch.bool))
    assert torch.allclose(decision.expert_weight.sum(-1), torch.ones(2, 5))
    assert decision.kept.all()
    assert (decision.expert_index[..., 0] != decision.expert_index[..., 1]).all()
