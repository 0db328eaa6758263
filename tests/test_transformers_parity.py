"""Equality with transformers' own SwitchTransformers, through checkpoint conversion in both directions."""

import pytest
import torch
from conftest import random_batch, reference_model, tiny_model
from transformers import SwitchTransformersForConditionalGeneration

from hf_switch import SwitchForConditionalGeneration, save_as_switch_transformers

# Each case: transformers config overrides, and how many source positions of row 0 are padding.
CASES = {
    "2-experts-capacity-free": (dict(num_experts=2, expert_capacity=64), 0),
    "4-experts-capacity-binds-router-bias": (dict(num_experts=4, expert_capacity=2, router_bias=True), 0),
    "8-experts-every-layer-sparse": (
        dict(num_experts=8, expert_capacity=2, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2),
        0,
    ),
    "16-experts-4-layers-padded": (
        dict(
            num_experts=16,
            expert_capacity=1,
            num_layers=4,
            num_decoder_layers=4,
            num_sparse_encoder_layers=2,
            num_sparse_decoder_layers=2,
        ),
        4,
    ),
    "gelu-uneven-decoder": (dict(dense_act_fn="gelu", num_decoder_layers=3, expert_capacity=3), 3),
}


def _converted_pair(tmp_path, overrides):
    reference = reference_model(**overrides)
    reference.save_pretrained(tmp_path / "transformers")
    ours = SwitchForConditionalGeneration.from_pretrained(tmp_path / "transformers").eval()
    return reference, ours


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers_after_loading_its_checkpoint(tmp_path, case):
    overrides, pad_last = CASES[case]
    reference, ours = _converted_pair(tmp_path, overrides)
    batch = random_batch(pad_last=pad_last)
    with torch.no_grad():
        expected = reference(**batch).logits
        actual = ours(**batch)
    assert (actual.logits - expected).abs().max().item() < 1e-5
    if overrides.get("expert_capacity", 64) < 4:
        assert actual.encoder_dropped_fraction.max() > 0, "the case should make capacity bind"


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers_after_writing_its_checkpoint(tmp_path, case):
    # transformers routes each sequence as a group; the converter refuses any other routing_group.
    overrides, pad_last = CASES[case]
    ours = tiny_model(
        routing_group="sequence",
        expert_capacity=overrides.get("expert_capacity", 64),
        **{k: v for k, v in overrides.items() if k not in ("expert_capacity", "dense_act_fn")},
        feed_forward_proj=overrides.get("dense_act_fn", "relu"),
    )
    save_as_switch_transformers(ours, tmp_path / "transformers")
    reference = SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path / "transformers").eval()
    batch = random_batch(pad_last=pad_last)
    with torch.no_grad():
        assert (ours(**batch).logits - reference(**batch).logits).abs().max().item() < 1e-5


def test_loss_and_router_losses_equal_transformers_with_one_sparse_layer_per_stack(tmp_path):
    # transformers concatenates all layers' router logits before its losses; with one sparse layer per stack that
    # is the same as hf_switch's sum over layers.
    reference, ours = _converted_pair(tmp_path, dict(num_experts=4, expert_capacity=2))
    batch = random_batch()
    with torch.no_grad():
        expected = reference(**batch, output_router_logits=True)
        actual = ours(**batch, output_router_logits=True)
    for name in ("encoder_aux_loss", "encoder_z_loss", "decoder_aux_loss", "decoder_z_loss", "loss"):
        assert getattr(actual, name).item() == pytest.approx(getattr(expected, name).item(), rel=1e-5), name
    for theirs, mine in zip(expected.encoder_router_logits, actual.encoder_router_logits, strict=True):
        assert torch.allclose(theirs, mine, atol=1e-6)


def test_router_losses_exist_when_every_layer_is_sparse(tmp_path):
    # transformers returns 0 for both router losses when every layer is sparse (its sparse step is 1).
    _, ours = _converted_pair(tmp_path, dict(num_sparse_encoder_layers=2, num_sparse_decoder_layers=2))
    output = ours(**random_batch())
    assert output.encoder_aux_loss > 0 and output.decoder_z_loss > 0
    assert output.encoder_expert_counts.shape == (2, 4)


def test_greedy_generation_without_cache_equals_transformers(tmp_path):
    reference, ours = _converted_pair(tmp_path, dict(num_experts=4, expert_capacity=2))
    input_ids = random_batch()["input_ids"]
    options = dict(max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(ours.generate(input_ids, **options), reference.generate(input_ids, **options))


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("routing_group", "batch", "'sequence' (transformers routes each sequence alone)"),
        ("expert_capacity", None, "an absolute capacity"),
        ("router_top_k", 2, "1 (transformers routes top-1 only)"),
    ],
)
def test_writing_a_checkpoint_transformers_cannot_express_is_refused(tmp_path, field, value, allowed):
    ours = tiny_model(**{"routing_group": "sequence", "expert_capacity": 2, field: value})
    with pytest.raises(ValueError, match=f"SwitchConfig.{field}={value!r} has no transformers equivalent") as raised:
        save_as_switch_transformers(ours, tmp_path / "transformers")
    assert allowed in str(raised.value)
    assert not (tmp_path / "transformers").exists()
