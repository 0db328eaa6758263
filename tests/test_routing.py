"""Routing math against hand-computed cases."""

import math

import pytest
import torch
from conftest import tiny_config

from hf_switch.experts import combine, group_by_expert
from hf_switch.modeling_switch import SwitchLayerFF
from hf_switch.routing import (
    RoutingGroups,
    SwitchRouter,
    expert_capacity,
    expert_priority,
    global_load_balancing_loss,
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


def test_capacity_counts_the_whole_group_in_training_and_each_prefix_in_an_evaluated_decoder():
    config = tiny_config(num_experts=4, capacity_factor=1.0, eval_capacity_factor=2.0, min_expert_capacity=1)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False  # padding kept out of routing
    by_sequence = RoutingGroups("sequence", 2, 8)
    training = expert_capacity(config, by_sequence, mask, training=True, causal=True)
    assert training.tolist() == [[2] * 8, [2] * 8]  # ceil(8 / 4), ceil(6 / 4)
    assert expert_capacity(config, by_sequence, mask, training=False, causal=False).tolist() == [[4] * 8, [3] * 8]
    decoder = expert_capacity(config, by_sequence, mask, training=False, causal=True)
    assert decoder[0].tolist() == [math.ceil(2 * t / 4) for t in range(1, 9)]
    batch = RoutingGroups("batch", 2, 8)
    assert expert_capacity(config, batch, mask, training=True, causal=True).tolist() == [[4] * 8] * 2  # 14 / 4
    prefix = [math.ceil(2 * n / 4) for n in (2, 4, 6, 8, 10, 12, 13, 14)]
    assert expert_capacity(config, batch, mask, training=False, causal=True).tolist() == [prefix] * 2
    cached = expert_capacity(config, batch, mask[:, :1], training=False, causal=True, past_tokens=torch.tensor([10]))
    assert cached.tolist() == [[6], [6]]  # ceil(2 * 12 / 4)


def test_absolute_capacity_wins_and_no_capacity_is_dropless():
    mask = torch.ones(2, 5, dtype=torch.bool)
    groups = RoutingGroups("batch", 2, 5)
    config = tiny_config(expert_capacity=3, capacity_factor=0.1)
    assert expert_capacity(config, groups, mask, True, False).tolist() == [[3] * 5] * 2
    dropless = tiny_config(capacity_factor=None, eval_capacity_factor=None)
    assert expert_capacity(dropless, groups, mask, True, False) is None
    assert expert_capacity(dropless, groups, mask, False, True) is None


@pytest.mark.parametrize("spec", ["sequence", "batch", 1, 4, 5, 100])
def test_routing_groups_gather_position_major_and_scatter_back(spec):
    tokens = torch.arange(12).reshape(3, 4)  # token id = 4 * sequence + position
    groups = RoutingGroups(spec, 3, 4)
    grouped = groups.gather(tokens)
    assert grouped.shape[0] == groups.num_groups
    assert torch.equal(groups.scatter(grouped), tokens)
    if spec != "sequence":
        order = [4 * sequence + position for position in range(4) for sequence in range(3)]
        assert grouped.flatten()[:12].tolist() == order
        assert not grouped.flatten()[12:].any()  # filler of the last fixed-size group


def test_routing_groups_count_tokens_per_group_and_up_to_each_position():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert RoutingGroups("sequence", 2, 3).tokens_per_group(mask).tolist() == [[3] * 3, [1] * 3]
    assert RoutingGroups("batch", 2, 3).tokens_per_group(mask).tolist() == [[4] * 3] * 2
    # Position-major groups of 3: (s0 p0, s1 p0, s0 p1) and (s1 p1, s0 p2, s1 p2).
    assert RoutingGroups(3, 2, 3).tokens_per_group(mask).tolist() == [[3, 3, 1], [3, 1, 1]]
    assert RoutingGroups("batch", 2, 3).tokens_up_to_position(mask).tolist() == [[2, 3, 4]] * 2


def _router_choosing(experts: list[list[int]], num_experts: int, **overrides):
    """A router and inputs whose top-1 choices are `experts` (`[B][T]`): one-hot inputs, identity-like classifier."""
    config = tiny_config(d_model=num_experts, num_experts=num_experts, **overrides)
    router = SwitchRouter(config).eval()
    with torch.no_grad():
        router.classifier.weight.copy_(torch.eye(num_experts) * 5)
    inputs = torch.nn.functional.one_hot(torch.tensor(experts), num_experts).float()
    return router, inputs


@pytest.mark.parametrize(
    "routing_group, kept",
    [
        ("sequence", [[True, True, True], [True, True, True]]),
        # Queue of expert 0: s0 p0, s1 p0, s0 p1 | s0 p2, s1 p2 beyond capacity 3.
        ("batch", [[True, True, False], [True, True, False]]),
        # Groups s0p0 s1p0 s0p1 s1p1 | s0p2 s1p2: expert 0 takes s0p0, s1p0, s0p1 ... capacity 2 drops s0p1.
        (4, [[True, False, True], [True, True, True]]),
    ],
)
def test_queues_are_position_major_within_a_group(routing_group, kept):
    capacity = 2 if isinstance(routing_group, int) else 3
    router, inputs = _router_choosing(
        [[0, 0, 0], [0, 1, 0]], num_experts=2, expert_capacity=capacity, routing_group=routing_group
    )
    decision = router(inputs, torch.ones(2, 3, dtype=torch.bool))
    assert decision.kept[..., 0].tolist() == kept


def test_load_balancing_loss_is_counted_per_group():
    # Two sequences, each collapsed on its own expert: unbalanced per sequence, balanced as one batch.
    probs = torch.tensor([[[0.9, 0.1]] * 4, [[0.1, 0.9]] * 4])
    index = probs.argmax(-1, keepdim=True)
    mask = torch.ones(2, 4, dtype=torch.bool)
    per_sequence = load_balancing_loss(probs, index, mask)
    batch = RoutingGroups("batch", 2, 4)
    per_batch = load_balancing_loss(batch.gather(probs), batch.gather(index), batch.gather(mask))
    assert per_sequence.item() == pytest.approx(2 * 0.9)
    assert per_batch.item() == pytest.approx(1.0)


def test_global_load_balancing_loss_takes_the_expert_fractions_it_is_given():
    probs = torch.tensor([[[0.75, 0.25], [0.25, 0.75]]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = global_load_balancing_loss(probs, mask, torch.tensor([0.8, 0.2]))
    assert loss.item() == pytest.approx(2 * (0.8 * 0.5 + 0.2 * 0.5))
    loss.backward()
    assert torch.allclose(probs.grad, torch.tensor([[[0.8, 0.2], [0.8, 0.2]]]))  # 2 * f_e / tokens


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


def test_drop_counts_match_a_hand_computed_case():
    router, inputs = _router_choosing([[0, 0, 0, 1, 0, 1]], num_experts=2, expert_capacity=2)
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
    router, inputs = _router_choosing(
        [[0, 0, 0, 0]], num_experts=2, expert_capacity=2, router_ignore_padding_tokens=True
    )
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
