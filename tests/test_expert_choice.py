"""Expert-choice routing in the encoder (Zhou et al. 2022): each expert takes the tokens of its routing group that
score it highest; refused in the decoder."""

import math

import pytest
import torch
from conftest import random_batch, tiny_config, tiny_model

from hf_switch.conversion import save_as_switch_transformers
from hf_switch.hub import describe_balancing
from hf_switch.modeling_switch import SwitchSparseMLP
from hf_switch.routing import SwitchRouter, routing_stats

EXPERT_CHOICE = dict(encoder_router_type="experts_choose", num_experts=4, capacity_factor=None)


def _encoder_config(**overrides):
    config = tiny_config(**{**EXPERT_CHOICE, **overrides})
    config.is_decoder = False
    return config


@pytest.mark.parametrize(("routing_group", "factor"), [("sequence", 1.0), ("batch", 1.0), ("batch", 2.0), (4, 1.5)])
def test_expert_choice_each_expert_takes_the_top_scoring_tokens_of_its_group(routing_group, factor):
    torch.manual_seed(0)
    router = SwitchRouter(_encoder_config(routing_group=routing_group, expert_choice_capacity_factor=factor))
    hidden = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, -2:] = False  # padding: no expert takes it
    decision = router(hidden, mask)
    assert decision.experts_choose and not decision.kept[0, -2:].any()
    groups = decision.groups
    probs, kept, routed = groups.gather(decision.probs), groups.gather(decision.kept), groups.gather(mask)
    for group in range(groups.num_groups):
        tokens = int(routed[group].sum())
        capacity = min(math.ceil(factor * tokens / 4), tokens)
        for expert in range(4):
            taken = kept[group, :, expert]
            assert int(taken.sum()) == capacity
            left = probs[group, :, expert][routed[group] & ~taken]
            if len(left):
                assert probs[group, :, expert][taken].min() >= left.max()


def test_expert_choice_layer_output_is_the_gate_weighted_sum_of_the_experts_that_took_each_token():
    torch.manual_seed(0)
    config = _encoder_config(routing_group="batch", expert_choice_capacity_factor=1.5)
    layer = SwitchSparseMLP(config)
    for parameter in layer.parameters():  # a bare layer's expert weights are uninitialised
        torch.nn.init.normal_(parameter, std=0.3)
    hidden = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    output, decision = layer(hidden, mask)
    expected = torch.zeros_like(hidden)
    experts = layer.experts
    for expert in range(4):
        expert_output = torch.relu(hidden @ experts.wi[expert].T) @ experts.wo[expert].T
        gate = decision.probs[..., expert] * decision.kept[..., expert]
        expected += gate[..., None] * expert_output
    assert torch.allclose(output, expected, atol=1e-6)
    untaken = ~decision.kept.any(dim=-1)
    assert torch.equal(output[untaken], torch.zeros_like(output[untaken]))


def test_expert_choice_counts_untaken_tokens_as_dropped_and_has_no_balancing_loss():
    torch.manual_seed(0)
    router = SwitchRouter(_encoder_config(expert_choice_capacity_factor=1.0)).train()
    hidden = torch.randn(4, 9, 16, requires_grad=True)
    decision = router(hidden, torch.ones(4, 9, dtype=torch.bool))
    stats = routing_stats(decision)
    untaken = (~decision.kept.any(dim=-1)).float().mean()
    assert stats.dropped_fraction.item() == pytest.approx(untaken.item())
    assert stats.aux_loss.item() == 0.0
    assert torch.equal(stats.expert_counts, torch.full((4,), 9))  # ceil(36 / 4) tokens each


def test_expert_choice_in_the_decoder_is_refused():
    with pytest.raises(Exception, match="decoder_router_type='experts_choose' is invalid.*autoregressive decoder"):
        tiny_config(decoder_router_type="experts_choose")


def test_expert_choice_encoder_trains_generates_and_keeps_the_decoder_token_choice():
    model = tiny_model(**EXPERT_CHOICE, router_expert_bias=True).train()
    encoder_router, decoder_router = (
        next(module for module in stack.modules() if isinstance(module, SwitchRouter))
        for stack in (model.encoder, model.decoder)
    )
    assert encoder_router.experts_choose and not decoder_router.experts_choose
    assert not encoder_router.uses_expert_bias and decoder_router.uses_expert_bias  # a bias cannot move expert choice
    output = model(**random_batch())
    output.loss.backward()
    assert encoder_router.classifier.weight.grad.abs().sum() > 0  # through the gates
    assert output.encoder_aux_loss.item() == 0.0
    model.eval()
    generated = model.generate(input_ids=random_batch()["input_ids"], max_new_tokens=6, do_sample=False)
    assert generated.shape[0] == 3


def test_expert_choice_conversion_to_transformers_is_refused(tmp_path):
    model = tiny_model(**EXPERT_CHOICE, routing_group="sequence", expert_capacity=4)
    with pytest.raises(ValueError, match="encoder_router_type='experts_choose' has no transformers equivalent"):
        save_as_switch_transformers(model, tmp_path)


def test_expert_choice_is_named_on_the_model_card():
    assert describe_balancing(tiny_config(**EXPERT_CHOICE)) == (
        "encoder: expert choice, balanced by construction (each expert takes 1.0 x its share of a routing group's "
        "tokens); decoder: auxiliary loss over each routing group"
    )
