import json
import math

import pytest
from conftest import tiny_config
from transformers import AutoConfig, SwitchTransformersConfig

from hf_switch import SwitchConfig, switch_config_from_transformers
from hf_switch.configuration_switch import sparse_layer_indices


def test_defaults_follow_the_paper():
    config = SwitchConfig()
    assert config.router_aux_loss_coef == 1e-2
    assert config.router_z_loss_coef == 1e-3
    assert config.router_dtype == "float32"
    assert (config.capacity_factor, config.eval_capacity_factor, config.router_top_k) == (1.25, None, 1)
    assert (config.routing_group, config.load_balancing_scope) == ("batch", "group")
    assert config.model_type == "hf_switch" != SwitchTransformersConfig.model_type
    assert config.num_decoder_layers == config.num_layers
    assert config.sparse_encoder_layers == [1, 3, 5, 7, 9, 11]


@pytest.mark.parametrize(
    ("num_layers", "num_sparse", "expected"),
    [(12, 6, [1, 3, 5, 7, 9, 11]), (12, 3, [1, 5, 9]), (4, 4, [0, 1, 2, 3]), (2, 1, [1]), (1, 1, [0]), (6, 0, [])],
)
def test_sparse_layers_are_placed_as_transformers_places_them(num_layers, num_sparse, expected):
    assert sparse_layer_indices(num_layers, num_sparse) == expected


BAD_FIELDS = [
    ("num_experts", 0, "num_experts"),
    ("num_sparse_encoder_layers", 3, "between 0 and the stack's 2 layers"),
    ("num_sparse_decoder_layers", -1, "num_sparse_decoder_layers"),
    ("router_jitter_noise", -0.1, "router_jitter_noise"),
    ("router_aux_loss_coef", math.nan, "router_aux_loss_coef"),
    ("router_z_loss_coef", math.inf, "router_z_loss_coef"),
    ("router_dtype", "float64", "router_dtype"),
    ("router_top_k", 5, "between 1 and num_experts=4"),
    ("router_top_k", 0, "router_top_k"),
    ("expert_capacity", 0, "expert_capacity"),
    ("routing_group", "token", "one of ('sequence', 'batch') or a positive number of tokens"),
    ("routing_group", 0, "routing_group"),
    ("load_balancing_scope", "batch", "one of ('group', 'global_batch')"),
    ("router_bias_update_rate", -0.1, "a finite number >= 0"),
    ("capacity_factor", 0.0, "capacity_factor"),
    ("eval_capacity_factor", -1.0, "eval_capacity_factor"),
    ("min_expert_capacity", 0, "min_expert_capacity"),
    ("expert_dropout", 1.0, "expert_dropout"),
    ("dropout_rate", -0.5, "dropout_rate"),
    ("expert_parallel_size", 3, "divisor of num_experts=4"),
    ("feed_forward_proj", "gated-tanh", "feed_forward_proj"),
    ("d_model", 0, "d_model"),
    ("num_heads", 0, "num_heads"),
    ("layer_norm_epsilon", 0.0, "layer_norm_epsilon"),
    ("relative_attention_num_buckets", 1, "relative_attention_num_buckets"),
    ("initializer_factor", -1.0, "initializer_factor"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_FIELDS)
def test_every_field_is_validated_with_a_message_naming_it(field, value, message):
    with pytest.raises(Exception) as raised:
        tiny_config(**{field: value})
    text = str(raised.value)
    assert field in text and str(value) in text and message in text


def test_sparse_count_that_the_step_cannot_place_is_refused():
    with pytest.raises(Exception, match="places 3, so use a divisor of 3"):
        tiny_config(num_layers=3, num_sparse_encoder_layers=2)


def test_wrong_type_is_refused():
    with pytest.raises(Exception, match="num_experts"):
        tiny_config(num_experts="8")


def test_auto_config_and_json_round_trip(tmp_path):
    config = tiny_config(capacity_factor=1.5, router_top_k=2, expert_dropout=0.4)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SwitchConfig)
    for field, value in config.to_dict().items():
        if field != "_name_or_path":
            assert getattr(loaded, field) == value, field
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "hf_switch"


def test_transformers_config_translates_with_its_own_defaults(tmp_path):
    reference = SwitchTransformersConfig(num_layers=4, num_decoder_layers=6, num_sparse_decoder_layers=3)
    reference.save_pretrained(tmp_path)
    config = SwitchConfig.from_pretrained(tmp_path)
    assert config.expert_capacity == reference.expert_capacity == 64
    assert config.router_aux_loss_coef == reference.router_aux_loss_coef
    assert config.sparse_decoder_layers == [1, 3, 5]
    assert config.feed_forward_proj == "relu"
    assert switch_config_from_transformers(reference).to_dict() == config.to_dict()


def test_transformers_config_with_zero_sparse_layers_keeps_what_transformers_builds():
    # transformers' "zero sparse layers" still places one, at index 1; the translation must say so.
    config = switch_config_from_transformers(SwitchTransformersConfig(num_layers=4, num_sparse_encoder_layers=0))
    assert config.sparse_encoder_layers == [1]


@pytest.mark.parametrize(
    ("depths", "encoder", "decoder"),
    [
        ((2, None), [1], [1]),
        ((12, None), [1, 3, 5, 7, 9, 11], [1, 3, 5, 7, 9, 11]),
        ((4, 2), [1, 3], [1]),
        ((1, 3), [0], [1]),
    ],
)
def test_sparse_layers_default_to_every_other_layer_of_the_configured_depth(depths, encoder, decoder):
    config = SwitchConfig(num_layers=depths[0], num_decoder_layers=depths[1])
    assert (config.sparse_encoder_layers, config.sparse_decoder_layers) == (encoder, decoder)
    reloaded = SwitchConfig.from_dict(config.to_dict())
    assert (reloaded.num_sparse_encoder_layers, reloaded.num_sparse_decoder_layers) == (len(encoder), len(decoder))
