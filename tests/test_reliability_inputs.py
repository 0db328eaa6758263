"""Reliability battery, inputs: bad config fields, configs of other models, bad token ids, empty and all-padding
batches, non-finite router inputs, expert-parallel sizes. Each case expects a named error or a well-defined output.

Explicit single cases of config fields live in tests/test_config.py; hypothesis here draws many values per field.
"""

import math
import re

import pytest
import torch
from conftest import VOCAB, random_batch, tiny_config, tiny_model
from huggingface_hub.errors import StrictDataclassError
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig, T5Config

from hf_switch import SwitchConfig, SwitchForConditionalGeneration
from hf_switch.configuration_switch import FEED_FORWARD_PROJECTIONS, ROUTER_DTYPES

FAST = settings(max_examples=25, deadline=None)
MODEL = tiny_model()  # read-only: every case here runs it in eval mode without changing it
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NEGATIVE = st.floats(max_value=0.0, exclude_max=True, allow_nan=False, allow_infinity=False)


def _not_positive_int():
    return st.integers(max_value=0)


def _rate_outside_unit_interval():
    return NEGATIVE | st.floats(min_value=1.0, allow_nan=False, allow_infinity=False) | NOT_FINITE


def _not_positive_float():
    return st.floats(max_value=0.0, allow_nan=False, allow_infinity=False) | NOT_FINITE


# Values out of range for each validated field of the tiny config (4 experts, 2+2 layers).
OUT_OF_RANGE = {
    **{
        field: _not_positive_int()
        for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_experts", "min_expert_capacity")
    },
    "num_layers": _not_positive_int(),
    "num_decoder_layers": _not_positive_int(),
    "num_sparse_encoder_layers": st.integers(max_value=-1) | st.integers(min_value=3),
    "num_sparse_decoder_layers": st.integers(max_value=-1) | st.integers(min_value=3),
    "expert_capacity": _not_positive_int(),
    "capacity_factor": _not_positive_float(),
    "eval_capacity_factor": _not_positive_float(),
    "router_top_k": st.integers(max_value=0) | st.integers(min_value=5),
    "router_jitter_noise": _rate_outside_unit_interval(),
    "router_dtype": st.text(max_size=8).filter(lambda text: text not in ROUTER_DTYPES),
    "router_z_loss_coef": NEGATIVE | NOT_FINITE,
    "router_aux_loss_coef": NEGATIVE | NOT_FINITE,
    "expert_dropout": _rate_outside_unit_interval(),
    "dropout_rate": _rate_outside_unit_interval(),
    "expert_parallel_size": st.integers(max_value=0) | st.integers(min_value=3).filter(lambda size: 4 % size),
    "relative_attention_num_buckets": st.integers(max_value=1),
    "relative_attention_max_distance": st.integers(max_value=1),
    "layer_norm_epsilon": _not_positive_float(),
    "feed_forward_proj": st.text(max_size=12).filter(lambda text: text not in FEED_FORWARD_PROJECTIONS),
    "initializer_factor": _not_positive_float(),
}
# Values no field accepts (the str fields refuse these strings by range, above).
WRONG_TYPE = st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)
SWITCH_FIELDS = sorted({*OUT_OF_RANGE, "router_bias", "router_ignore_padding_tokens", "router_check_finite"})


def _assert_refused_naming(field, value):
    with pytest.raises(StrictDataclassError) as raised:  # wraps our ValueError or strict's TypeError
        tiny_config(**{field: value})
    assert field in str(raised.value) and repr(value) in str(raised.value), str(raised.value)


@FAST
@given(data=st.data())
def test_every_field_out_of_range_is_refused_naming_field_and_value(data):
    field = data.draw(st.sampled_from(sorted(OUT_OF_RANGE)), label="field")
    _assert_refused_naming(field, data.draw(OUT_OF_RANGE[field], label="value"))


@FAST
@given(field=st.sampled_from(SWITCH_FIELDS), value=WRONG_TYPE)
def test_every_field_of_the_wrong_type_is_refused_naming_field_and_value(field, value):
    _assert_refused_naming(field, value)


@FAST
@given(flag=st.sampled_from(["router_check_finite", "router_bias", "router_ignore_padding_tokens"]))
def test_boolean_fields_take_only_booleans(flag):
    for value in (1, "yes", None):
        _assert_refused_naming(flag, value)


@FAST
@given(num_experts=st.integers(1, 16), expert_parallel_size=st.integers(1, 16))
def test_expert_parallel_size_must_divide_num_experts(num_experts, expert_parallel_size):
    fields = dict(num_experts=num_experts, expert_parallel_size=expert_parallel_size)
    if num_experts % expert_parallel_size:
        with pytest.raises(StrictDataclassError, match=f"a positive divisor of num_experts={num_experts}"):
            tiny_config(**fields)
    else:
        assert tiny_config(**fields).expert_parallel_size == expert_parallel_size
    # A divisor > 1 is valid but refused by the model until expert parallelism exists: see
    # tests/test_training_signals.py::test_expert_parallelism_is_refused_until_it_exists.


@pytest.mark.parametrize("foreign", [BertConfig(), T5Config()], ids=["bert", "t5"])
@pytest.mark.parametrize("loader", [SwitchConfig, SwitchForConditionalGeneration])
def test_a_config_of_another_model_type_is_refused_naming_both_types(tmp_path, foreign, loader):
    foreign.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"model_type='{foreign.model_type}', but SwitchConfig loads model_type"):
        loader.from_pretrained(tmp_path)


# Token ids: (argument, bad position filler); the decoder's ids and the labels are checked like the encoder's.
@FAST
@given(
    argument=st.sampled_from(["input_ids", "decoder_input_ids", "labels"]),
    bad_id=st.integers(VOCAB, 2**40) | st.integers(-(2**40), -1).filter(lambda token: token != -100),
    position=st.integers(0, 8),
)
def test_token_ids_outside_the_vocabulary_are_named(argument, bad_id, position):
    batch = random_batch(batch=2, source=9, target=9)
    batch["decoder_input_ids"] = batch["labels"].clone()
    batch[argument][1, position] = bad_id
    with pytest.raises(ValueError, match=rf"^{argument}: token id {bad_id} is outside the vocabulary"):
        MODEL(**batch)


def test_ignored_labels_are_not_out_of_vocabulary():
    batch = random_batch()
    batch["labels"][:, -2:] = -100
    assert torch.isfinite(MODEL(**batch).loss)


@pytest.mark.parametrize(
    ("shapes", "argument"),
    [
        (((0, 5), (0, 3)), "input_ids: got shape (0, 5)"),
        (((2, 0), (2, 3)), "input_ids: got shape (2, 0)"),
        (((2, 5), (2, 0)), "decoder_input_ids: got shape (2, 0)"),
    ],
    ids=["batch_size_0", "source_length_0", "target_length_0"],
)
def test_empty_batches_are_refused_naming_the_argument(shapes, argument):
    (source_shape, target_shape) = shapes
    inputs = dict(
        input_ids=torch.full(source_shape, 2, dtype=torch.long),
        decoder_input_ids=torch.full(target_shape, 2, dtype=torch.long),
    )
    with pytest.raises(ValueError, match=rf"^{re.escape(argument)}; the batch size and the sequence length must be"):
        MODEL(**inputs)


def test_empty_inputs_embeds_are_refused_too():
    with pytest.raises(ValueError, match=r"^inputs_embeds: got shape \(2, 0\)"):
        MODEL(inputs_embeds=torch.zeros(2, 0, 16), decoder_input_ids=torch.ones(2, 1, dtype=torch.long))


@pytest.mark.parametrize("ignore_padding", [False, True])
def test_an_all_padding_sequence_is_finite_and_leaves_the_others_unchanged(ignore_padding):
    model = tiny_model(router_ignore_padding_tokens=ignore_padding, eval_capacity_factor=None)  # dropless
    batch = random_batch(batch=3)
    batch["input_ids"][0] = 0
    batch["attention_mask"][0] = 0
    with torch.no_grad():
        output = model(**batch, output_router_logits=True)
        alone = model(**{key: value[1:] for key, value in batch.items()})
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.loss)
    # Routing groups are sequences, so the padded row changes nothing for the others.
    assert torch.allclose(output.logits[1:], alone.logits, atol=1e-6)
    routed_source_tokens = output.encoder_expert_counts.sum().item()
    assert routed_source_tokens == (22 if ignore_padding else 33)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_non_finite_router_logits_are_reported_with_the_layer(stack, poison):
    model = tiny_model()
    router = getattr(model, stack).block[1].layer[-1].mlp.router
    with torch.no_grad():
        router.classifier.weight[0, 0] = poison
    with pytest.raises(FloatingPointError, match=rf"router logits of {stack} layer 1 hold \d+ NaN and \d+ inf"):
        model(**random_batch())


def test_non_finite_inputs_embeds_are_caught_at_the_first_router():
    embeds = torch.zeros(2, 4, 16)
    embeds[0, 1, 3] = math.nan
    with pytest.raises(FloatingPointError, match="router_check_finite=False turns this check off"):
        MODEL(inputs_embeds=embeds, decoder_input_ids=torch.ones(2, 1, dtype=torch.long))


def test_the_finite_check_can_be_switched_off():
    model = tiny_model(router_check_finite=False)
    with torch.no_grad():
        model.encoder.block[1].layer[-1].mlp.router.classifier.weight[0, 0] = math.nan
        logits = model(**random_batch(), output_router_logits=True).encoder_router_logits[0]
    assert logits.isnan().any()


def test_non_finite_router_logits_are_reported_while_generating():
    # generate() skips the routing statistics; the check does not depend on them.
    model = tiny_model()
    with torch.no_grad():
        model.decoder.block[1].layer[-1].mlp.router.classifier.weight[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="router logits of decoder layer 1"):
        model.generate(random_batch()["input_ids"], max_new_tokens=3)
