"""T5 span corruption (Raffel et al. 2020), the pretraining objective of the Switch paper.

A fraction `noise_density` of each sequence's tokens, in spans of mean length `mean_noise_span_length`, is
removed from the input and replaced by one sentinel token per span; the target lists the sentinels, each followed
by the tokens it replaced. Each example's mask comes from its own generator, seeded by the run's seed and the
example's index, so a run resumed from a checkpoint sees exactly the examples an uninterrupted run sees.
"""

from dataclasses import dataclass

import torch


def corrupted_lengths(raw_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """Input and target lengths (with EOS) that a raw sequence of `raw_length` tokens corrupts into."""
    num_noise = max(1, round(raw_length * noise_density))
    num_spans = max(1, round(num_noise / mean_noise_span_length))
    return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def raw_length_for_input_length(input_length: int, noise_density: float, mean_noise_span_length: float) -> int:
    """The longest raw length whose corrupted input fits in `input_length` tokens."""
    raw_length = input_length
    while corrupted_lengths(raw_length + 1, noise_density, mean_noise_span_length)[0] <= input_length:
        raw_length += 1
    return raw_length


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`[length]` bool, True on noise tokens: `round(length * density)` of them in alternating random spans.

    The sequence starts with a non-noise span, as in T5's reference implementation.
    """
    num_noise = min(max(1, round(length * noise_density)), length - 1)
    num_spans = min(max(1, round(num_noise / mean_noise_span_length)), num_noise, length - num_noise)

    def random_segmentation(num_items: int, num_segments: int) -> torch.Tensor:
        """Random positive lengths of `num_segments` segments that add up to `num_items`."""
        boundaries = torch.randperm(num_items - 1, generator=generator)[: num_segments - 1] + 1
        edges = torch.cat([torch.tensor([0]), boundaries.sort().values, torch.tensor([num_items])])
        return edges.diff()

    noise_lengths = random_segmentation(num_noise, num_spans)
    keep_lengths = random_segmentation(length - num_noise, num_spans)
    interleaved = torch.stack([keep_lengths, noise_lengths], dim=1).flatten()
    is_noise = torch.tensor([False, True]).repeat(num_spans)
    return is_noise.repeat_interleave(interleaved)


@dataclass
class SpanCorruption:
    """Turns raw token chunks into span-corrupted `input_ids` and `labels`, as a `datasets.map` function.

    Args:
        sentinel_ids: ids of `<extra_id_0>`, `<extra_id_1>`, ..., in that order.
        eos_token_id: appended to inputs and targets.
        seed: with the example's index, seeds the example's mask.
    """

    sentinel_ids: list[int]
    eos_token_id: int
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    seed: int = 0

    def corrupt(self, tokens: list[int], generator: torch.Generator | None = None) -> tuple[list[int], list[int]]:
        """One raw chunk -> (input ids, target ids), both ending with EOS."""
        mask = random_spans_noise_mask(len(tokens), self.noise_density, self.mean_noise_span_length, generator)
        inputs, targets, span = [], [], -1
        for position, (token, is_noise) in enumerate(zip(tokens, mask.tolist(), strict=True)):
            if is_noise and (position == 0 or not mask[position - 1]):
                span += 1
                if span >= len(self.sentinel_ids):
                    raise ValueError(
                        f"span corruption needs more than the tokenizer's {len(self.sentinel_ids)} sentinel tokens; "
                        "shorten max_source_length or add sentinels (<extra_id_N>)."
                    )
                inputs.append(self.sentinel_ids[span])
                targets.append(self.sentinel_ids[span])
            (targets if is_noise else inputs).append(token)
        return inputs + [self.eos_token_id], targets + [self.eos_token_id]

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        """`datasets.map(..., batched=True, with_indices=True)` function over a column of raw chunks."""
        corrupted = [
            self.corrupt(tokens, torch.Generator().manual_seed(self.seed * 1_000_003 + index))
            for tokens, index in zip(batch["input_ids"], indices, strict=True)
        ]
        return {"input_ids": [inputs for inputs, _ in corrupted], "labels": [targets for _, targets in corrupted]}
