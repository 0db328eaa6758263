"""A Switch model without sparse layers, or with one expert that drops nothing, is T5."""

import pytest
import torch
from conftest import random_batch, tiny_model, tiny_t5
from transformers import T5ForConditionalGeneration


def _t5(feed_forward_proj: str, num_decoder_layers=2) -> T5ForConditionalGeneration:
    return tiny_t5(feed_forward_proj=feed_forward_proj, num_decoder_layers=num_decoder_layers)


def _t5_state_as_switch(t5: T5ForConditionalGeneration, sparse_single_expert: bool) -> dict:
    state = {}
    for key, value in t5.state_dict().items():
        key = key.replace(".DenseReluDense.", ".mlp.")
        if sparse_single_expert and ".mlp.w" in key:
            key = key.replace(".weight", "").replace(".mlp.", ".mlp.experts.")
            value = value[None]
        state[key] = value
    return state


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_no_sparse_layers_reproduces_t5_exactly(feed_forward_proj):
    t5 = _t5(feed_forward_proj, num_decoder_layers=3)
    switch = tiny_model(
        feed_forward_proj=feed_forward_proj,
        num_decoder_layers=3,
        num_sparse_encoder_layers=0,
        num_sparse_decoder_layers=0,
    )
    switch.load_state_dict(_t5_state_as_switch(t5, sparse_single_expert=False), strict=True)
    batch = random_batch(pad_last=2)
    with torch.no_grad():
        expected, actual = t5(**batch), switch(**batch)
    assert torch.equal(actual.logits, expected.logits)
    assert actual.loss.item() == expected.loss.item()
    assert actual.encoder_aux_loss.item() == 0.0
    # T5's own cached generation fails when num_decoder_layers != num_layers (its cache is sized by num_layers).
    expected_tokens = t5.generate(batch["input_ids"], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(switch.generate(batch["input_ids"], max_new_tokens=8, do_sample=False), expected_tokens)


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_every_layer_one_dropless_expert_reproduces_t5(feed_forward_proj):
    t5 = _t5(feed_forward_proj)
    switch = tiny_model(
        feed_forward_proj=feed_forward_proj,
        num_experts=1,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
        capacity_factor=None,
        eval_capacity_factor=None,
    )
    missing, unexpected = switch.load_state_dict(_t5_state_as_switch(t5, sparse_single_expert=True), strict=False)
    assert unexpected == [] and all("router" in key for key in missing)
    batch = random_batch()
    with torch.no_grad():
        difference = (switch(**batch).logits - t5(**batch).logits).abs().max().item()
    assert difference < 1e-5
