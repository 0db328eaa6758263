"""Cases of transformers' model tester (`ModelTesterMixin`, `GenerationTesterMixin`) that the other test files do not
already cover, run on hf_switch's model and, as the reference column, on transformers' `SwitchTransformers` with the
same tiny dimensions."""

import pytest
import torch
from conftest import random_batch, reference_model, tiny_model

from hf_switch import SwitchForConditionalGeneration

KINDS = {"hf_switch": tiny_model, "transformers": reference_model}


@pytest.fixture(params=KINDS, ids=KINDS)
def build(request):
    return KINDS[request.param]


def test_inputs_embeds_give_the_input_ids_logits(build):
    model, batch = build(), random_batch()
    with torch.no_grad():
        expected = model(**batch).logits
        embedded = model(
            inputs_embeds=model.shared(batch["input_ids"]),
            attention_mask=batch["attention_mask"],
            decoder_inputs_embeds=model.shared(model._shift_right(batch["labels"])),
        ).logits
    assert torch.equal(embedded, expected)


def test_tuple_and_dict_outputs_hold_the_same_values(build):
    model, batch = build(), random_batch()
    with torch.no_grad():
        as_dict = model(**batch, output_hidden_states=True, use_cache=False)
        as_tuple = model(**batch, output_hidden_states=True, use_cache=False, return_dict=False)
    values = as_dict.to_tuple()
    assert len(as_tuple) == len(values)
    for ours, theirs in zip(as_tuple, values, strict=True):
        flat = torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(theirs)
        assert all(torch.equal(a, b) for a, b in zip(*flat, strict=True))


def test_hidden_states_and_attentions_retain_gradients(build):
    model, batch = build().train(), random_batch()
    model.set_attn_implementation("eager")
    output = model(**batch, output_hidden_states=True, output_attentions=True)
    kept = [output.encoder_hidden_states[0], output.decoder_hidden_states[0], output.encoder_attentions[0]]
    kept += [output.decoder_attentions[0], output.cross_attentions[0]]
    for tensor in kept:
        tensor.retain_grad()
    output.logits.flatten()[0].backward()
    assert all(tensor.grad is not None for tensor in kept)


@pytest.mark.parametrize(
    "generation",
    [
        dict(num_beams=2, do_sample=True),
        dict(num_beams=3, num_return_sequences=2),
        dict(do_sample=True, top_k=5, num_return_sequences=2),
    ],
    ids=["beam-sample", "beams-return-2", "sample-return-2"],
)
def test_sampling_and_beam_generation_give_one_row_per_returned_sequence(build, generation):
    model, batch = build(), random_batch()
    torch.manual_seed(0)
    generated = model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5, **generation
    )
    assert generated.shape[0] == 3 * generation.get("num_return_sequences", 1) and generated.shape[1] <= 6


@pytest.mark.parametrize(
    "assistance",
    [dict(prompt_lookup_num_tokens=2), dict(cache_implementation="static"), "assistant model"],
    ids=["prompt-lookup", "static-cache", "assistant-model"],
)
def test_assisted_and_static_cache_decoding_give_the_greedy_output(build, assistance):
    model, batch = build(), random_batch(batch=1)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6)
    expected = model.generate(**inputs)
    if assistance == "assistant model":
        assistance = dict(assistant_model=build(seed=3))
    assert torch.equal(model.generate(**inputs, **assistance), expected)


def test_ignore_mismatched_sizes_reinitialises_only_the_mismatched_weight(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    resized = SwitchForConditionalGeneration.from_pretrained(tmp_path, vocab_size=80, ignore_mismatched_sizes=True)
    assert resized.shared.weight.shape == (80, 16)
    loaded, original = resized.state_dict(), model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in original.items() if key not in SHARED_VOCAB_KEYS)


SHARED_VOCAB_KEYS = {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
