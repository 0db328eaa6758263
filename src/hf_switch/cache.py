"""A decoder cache that also remembers which experts earlier positions chose.

Expert capacity is counted per sequence in position order, which is causal: a token's place in its expert's queue
depends only on earlier positions. Carrying every sparse layer's past choices through the cache lets cached
decoding route each new token exactly as a forward pass over the whole sequence would.
"""

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache


class SwitchCache(EncoderDecoderCache):
    """`EncoderDecoderCache` plus, per sparse decoder layer, the experts chosen at each cached position.

    `routing_history[layer_idx]` is `[batch, cached_positions, top_k]`, -1 where a position was not routed
    (ignored padding). Every batch operation of the key/value caches (beam reordering, cropping, repeating,
    selecting) is applied to it too.
    """

    def __init__(self, self_attention_cache=None, cross_attention_cache=None, config=None):
        super().__init__(
            self_attention_cache if self_attention_cache is not None else DynamicCache(config=config),
            cross_attention_cache if cross_attention_cache is not None else DynamicCache(config=config),
        )
        self.routing_history: dict[int, torch.Tensor] = {}

    @classmethod
    def wrap(cls, cache: EncoderDecoderCache) -> "SwitchCache":
        """A `SwitchCache` sharing an empty `EncoderDecoderCache`'s key/value caches."""
        if isinstance(cache, SwitchCache):
            return cache
        if cache.get_seq_length() > 0:
            raise ValueError(
                f"cache: got a {type(cache).__name__} that already holds {cache.get_seq_length()} positions but no "
                "record of their expert choices, so expert capacity cannot be counted. Start decoding with an empty "
                "cache or a hf_switch SwitchCache."
            )
        return cls(cache.self_attention_cache, cache.cross_attention_cache)

    def routed_experts(self, layer_idx: int) -> torch.Tensor | None:
        """`[batch, cached_positions, top_k]` experts chosen at cached positions of a layer, or None."""
        return self.routing_history.get(layer_idx)

    def record_routing(self, layer_idx: int, expert_index: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Append the choices `[batch, new_positions, top_k]` of new positions (`token_mask` `[batch, new]`)."""
        choices = expert_index.masked_fill(~token_mask[:, :, None], -1)
        past = self.routing_history.get(layer_idx)
        self.routing_history[layer_idx] = choices if past is None else torch.cat([past, choices], dim=1)

    def _apply_to_history(self, function) -> None:
        self.routing_history = {layer: function(history) for layer, history in self.routing_history.items()}

    def reset(self):
        super().reset()
        self.routing_history = {}

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._apply_to_history(lambda history: history.index_select(0, beam_idx.to(history.device)))

    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        length = self.get_seq_length()
        self._apply_to_history(lambda history: history[:, :length])

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._apply_to_history(lambda history: history.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._apply_to_history(lambda history: history[indices])
