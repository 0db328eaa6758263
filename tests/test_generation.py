"""Generation through transformers' GenerationMixin: cached decoding routes exactly as a full forward pass."""

import pytest
import torch
from conftest import random_batch, tiny_model
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

import hf_switch.modeling_switch as modeling
from hf_switch import SwitchCache, SwitchForConditionalGeneration, SwitchModel

CASES = {
    "absolute-capacity": dict(num_experts=2, expert_capacity=2),
    "capacity-factor-per-prefix": dict(
        num_experts=2, capacity_factor=0.6, eval_capacity_factor=0.6, min_expert_capacity=1
    ),
    "every-decoder-layer-sparse-3-layers": dict(
        num_experts=3, expert_capacity=2, num_decoder_layers=3, num_sparse_decoder_layers=3
    ),
    "top-2": dict(num_experts=4, router_top_k=2, expert_capacity=3),
    "ignored-padding": dict(num_experts=2, expert_capacity=2, router_ignore_padding_tokens=True),
}


def _inputs():
    batch = random_batch(pad_last=3)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.mark.parametrize("routing_group", ["sequence", "batch"])
@pytest.mark.parametrize("case", CASES)
def test_greedy_with_cache_equals_without_cache_when_capacity_binds(case, routing_group):
    model = tiny_model(**CASES[case], routing_group=routing_group)
    inputs = _inputs()
    cached = model.generate(**inputs, max_new_tokens=14, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=14, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        replay = model(**inputs, decoder_input_ids=cached)
    assert replay.decoder_dropped_fraction.max() > 0, "capacity should bind in the decoder for this case"


@pytest.mark.parametrize(
    "routing",
    [
        dict(routing_group="sequence", expert_capacity=2),
        dict(routing_group="batch", eval_capacity_factor=None),
        dict(routing_group=4, eval_capacity_factor=None),
    ],
)
def test_beam_search_with_cache_equals_without_cache(routing):
    model = tiny_model(num_experts=2, **routing)
    options = dict(max_new_tokens=10, num_beams=3, do_sample=False, num_return_sequences=2)
    assert torch.equal(model.generate(**_inputs(), **options), model.generate(**_inputs(), **options, use_cache=False))


@pytest.mark.parametrize("capacity", [dict(expert_capacity=2), dict(eval_capacity_factor=1.0)])
def test_beam_search_is_refused_where_groups_span_sequences_and_capacity_binds(capacity):
    model = tiny_model(num_experts=2, routing_group="batch", **capacity)
    with pytest.raises(ValueError, match="Beam search with SwitchConfig.routing_group='batch'"):
        model.generate(**_inputs(), max_new_tokens=4, num_beams=2)


def test_fixed_size_groups_refuse_decoder_capacity_outside_training():
    model = tiny_model(num_experts=2, routing_group=8, eval_capacity_factor=1.0)
    with pytest.raises(ValueError, match="routing_group=8 with eval_capacity_factor=1.0"):
        model(**random_batch())
    absolute = tiny_model(num_experts=2, routing_group=8, expert_capacity=2)
    with pytest.raises(ValueError, match="cached decoding cannot tell which fixed-size group"):
        absolute.generate(**_inputs(), max_new_tokens=4)


def test_cached_decoding_in_training_mode_with_a_capacity_factor_is_refused():
    model = tiny_model(num_experts=2, capacity_factor=1.0).train()
    with pytest.raises(ValueError, match=r"Call model.eval\(\) before decoding with a cache"):
        model.generate(**_inputs(), max_new_tokens=4)


@pytest.mark.parametrize("routing_group", ["sequence", "batch", 5])
def test_evaluation_by_default_gives_each_sequence_the_output_it_has_alone(routing_group):
    model = tiny_model(num_experts=2, routing_group=routing_group, capacity_factor=0.5)  # binds in training only
    batch = random_batch(batch=4, pad_last=3)
    with torch.no_grad():
        together = model(**batch)
        generated = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8, do_sample=False
        )
        for row in range(4):
            length = int(batch["attention_mask"][row].sum())
            alone = {name: tensor[row : row + 1, :length] for name, tensor in batch.items() if name != "labels"}
            logits = model(**alone, labels=batch["labels"][row : row + 1]).logits
            assert (logits - together.logits[row : row + 1]).abs().max().item() < 1e-5
            single = model.generate(**alone, max_new_tokens=8, do_sample=False)
            assert torch.equal(single[0], generated[row, : single.shape[1]])


def test_sampling_with_cache_equals_without_cache_for_a_seed():
    model = tiny_model(**CASES["capacity-factor-per-prefix"])
    options = dict(max_new_tokens=10, do_sample=True, top_k=8)
    torch.manual_seed(3)
    cached = model.generate(**_inputs(), **options)
    torch.manual_seed(3)
    assert torch.equal(cached, model.generate(**_inputs(), **options, use_cache=False))


@pytest.mark.parametrize("cache_keyword", ["cache", "past_key_values"])  # transformers' deprecated alias
@pytest.mark.parametrize("model_class", [SwitchForConditionalGeneration, SwitchModel])
def test_stepwise_logits_with_cache_equal_the_full_forward(cache_keyword, model_class):
    model = model_class(tiny_model(**CASES["absolute-capacity"]).config).eval()
    inputs = _inputs()
    decoder_input_ids = random_batch(target=8, seed=5)["labels"]

    def outputs(output):
        return output.logits if model_class is SwitchForConditionalGeneration else output.last_hidden_state

    with torch.no_grad():
        full = outputs(model(**inputs, decoder_input_ids=decoder_input_ids))
        encoder_outputs = model.get_encoder()(**inputs)
        cache, steps = None, []
        for position in range(decoder_input_ids.shape[1]):
            output = model(
                encoder_outputs=encoder_outputs,
                attention_mask=inputs["attention_mask"],
                decoder_input_ids=decoder_input_ids[:, position : position + 1],
                use_cache=True,
                **{cache_keyword: cache},
            )
            cache = output.cache
            steps.append(outputs(output))
    assert isinstance(cache, SwitchCache)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_cache_operations_keep_routing_history_aligned():
    cache = SwitchCache()
    cache.record_routing(1, torch.tensor([[[0], [1]], [[1], [1]]]), torch.tensor([[True, False], [True, True]]))
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.routed_experts(1).tolist() == [[[1], [1]], [[0], [-1]]]
    cache.batch_repeat_interleave(2)
    assert cache.routed_experts(1).shape == (4, 2, 1)
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert cache.routed_experts(1).tolist() == [[[1], [1]], [[0], [-1]]]
    cache.reset()
    assert cache.routed_experts(1) is None


def test_a_filled_plain_cache_is_refused_with_a_clear_error():
    model = tiny_model()
    inputs = _inputs()
    self_attention = DynamicCache()
    self_attention.update(torch.zeros(3, 2, 4, 4), torch.zeros(3, 2, 4, 4), 0)
    plain = EncoderDecoderCache(self_attention, DynamicCache())
    with pytest.raises(ValueError, match="already holds 4 positions but no record of their expert choices"):
        model(**inputs, decoder_input_ids=torch.zeros(3, 1, dtype=torch.long), cache=plain, use_cache=True)


def test_generate_skips_routing_statistics_and_decodes_the_same(monkeypatch):
    model = tiny_model(**CASES["capacity-factor-per-prefix"])
    options = dict(max_new_tokens=8, do_sample=False)
    with_stats = model.generate(**_inputs(), **options, output_routing_stats=True)
    calls = []
    monkeypatch.setattr(modeling, "routing_stats", lambda *arguments: calls.append(arguments))
    assert torch.equal(model.generate(**_inputs(), **options), with_stats)
    assert calls == []


def test_a_forward_without_routing_statistics_has_the_same_logits_and_no_router_fields():
    model = tiny_model(**CASES["absolute-capacity"])
    batch = random_batch()
    with torch.no_grad():
        full = model(**batch)
        bare = model(
            input_ids=batch["input_ids"],
            decoder_input_ids=model._shift_right(batch["labels"]),
            output_routing_stats=False,
        )
    assert torch.equal(bare.logits, full.logits)
    assert full.encoder_expert_counts is not None and full.decoder_aux_loss is not None
    assert bare.encoder_expert_counts is None and bare.decoder_aux_loss is None and bare.decoder_z_loss is None
    with pytest.raises(ValueError, match="output_routing_stats=False with labels"):
        model(**batch, output_routing_stats=False)
