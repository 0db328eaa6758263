import pytest
import torch

from hf_switch.training.span_corruption import (
    SpanCorruption,
    corrupted_lengths,
    random_spans_noise_mask,
    raw_length_for_input_length,
)

SENTINELS = list(range(1000, 1100))


def _reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    """Undo span corruption: put each sentinel's target tokens back in its place."""
    spans, current = {}, None
    for token in targets[:-1]:
        if token in SENTINELS:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    restored = []
    for token in inputs[:-1]:
        restored.extend(spans[token] if token in SENTINELS else [token])
    return restored


@pytest.mark.parametrize("length", [10, 57, 114])
def test_mask_has_the_requested_noise_and_starts_with_kept_tokens(length):
    torch.manual_seed(length)
    mask = random_spans_noise_mask(length, 0.15, 3.0)
    assert mask.shape == (length,)
    assert mask.sum().item() == max(1, round(length * 0.15))
    assert not mask[0]


def test_corruption_is_invertible_and_has_the_predicted_lengths():
    corruption = SpanCorruption(sentinel_ids=SENTINELS, eos_token_id=1)
    tokens = list(range(10, 124))
    inputs, targets = corruption.corrupt(tokens, torch.Generator().manual_seed(0))
    assert _reconstruct(inputs, targets) == tokens
    assert (len(inputs), len(targets)) == corrupted_lengths(len(tokens), 0.15, 3.0)
    assert inputs[-1] == targets[-1] == 1
    assert targets[0] == SENTINELS[0]


def test_raw_length_fills_but_does_not_exceed_the_input_length():
    raw = raw_length_for_input_length(128, 0.15, 3.0)
    assert corrupted_lengths(raw, 0.15, 3.0)[0] <= 128 < corrupted_lengths(raw + 1, 0.15, 3.0)[0]


def test_map_function_is_deterministic_per_example_index():
    corruption = SpanCorruption(sentinel_ids=SENTINELS, eos_token_id=1, seed=7)
    chunks = {"input_ids": [list(range(10, 60)), list(range(10, 60))]}
    first = corruption(chunks, indices=[0, 1])
    assert first == corruption(chunks, indices=[0, 1])
    assert first["input_ids"][0] != first["input_ids"][1], "two examples should get different masks"
    assert corruption({"input_ids": chunks["input_ids"][1:]}, indices=[1])["input_ids"][0] == first["input_ids"][1]


def test_too_few_sentinels_is_a_clear_error():
    corruption = SpanCorruption(sentinel_ids=SENTINELS[:1], eos_token_id=1)
    with pytest.raises(ValueError, match="more than the tokenizer's 1 sentinel tokens"):
        corruption.corrupt(list(range(10, 110)), torch.Generator().manual_seed(0))
