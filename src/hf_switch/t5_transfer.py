"""What a Switch model shares with transformers' T5, for moving weights between them (distillation, upcycling).

Both models are built from T5's own attention, layer-norm and dense feed-forward modules, so everything but the
feed-forward networks of sparse layers is the same module tree: T5's `block[i].layer[-1].DenseReluDense` is
hf_switch's `block[i].layer[-1].mlp`.
"""

from collections.abc import Iterator, Sequence

import torch
from torch import nn

# Config fields that mean the same in `T5Config` and `SwitchConfig` and fix the computation of the shared modules.
T5_ARCHITECTURE_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "layer_norm_epsilon",
    "feed_forward_proj",
)
# All the fields the two configs share.
T5_SHARED_FIELDS = (*T5_ARCHITECTURE_FIELDS, "dropout_rate", "initializer_factor", "pad_token_id", "eos_token_id")


def shared_config_fields(config) -> dict:
    """The architecture fields of a `T5Config` or `SwitchConfig`, as keyword arguments for the other one.

    A `T5Config` built without `decoder_start_token_id` has no such attribute; T5 starts decoding with the pad
    token then.
    """
    fields = {name: getattr(config, name) for name in T5_SHARED_FIELDS}
    fields["decoder_start_token_id"] = getattr(config, "decoder_start_token_id", config.pad_token_id)
    return fields


def feed_forward_weight_names(config) -> tuple[str, ...]:
    """Names of the feed-forward projections: `wi`, `wo`, or `wi_0`, `wi_1`, `wo` for a gated activation."""
    return ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")


# Modules whose weight may be tied to `shared` (the token embeddings).
EMBEDDING_PATHS = ("encoder.embed_tokens", "decoder.embed_tokens", "lm_head")


def untie_like(source: nn.Module, target: nn.Module) -> None:
    """Give `target` its own copy of each embedding or head that `source` does not tie to `source.shared`.

    T5 built in memory always ties them; a Switch model with `tie_word_embeddings=False` ties none (as transformers' own
    SwitchTransformers does), so its T5 student needs untied copies to hold the same weights.
    """
    for path in EMBEDDING_PATHS:
        target_module = target.get_submodule(path)
        if (
            source.get_submodule(path).weight is not source.shared.weight
            and target_module.weight is target.shared.weight
        ):
            target_module.weight = nn.Parameter(target_module.weight.clone())


def paired_blocks(
    source: nn.Module, target: nn.Module, encoder_layers: Sequence[int], decoder_layers: Sequence[int]
) -> Iterator[tuple[str, int, nn.Module, nn.Module]]:
    """`(stack, source_index, source_block, target_block)`: target block `i` of each stack pairs with source block
    `layers[i]` of that stack."""
    for stack, layers in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        source_blocks, target_blocks = getattr(source, stack).block, getattr(target, stack).block
        for source_index, target_block in zip(layers, target_blocks, strict=True):
            yield stack, source_index, source_blocks[source_index], target_block


@torch.no_grad()
def copy_non_ffn_weights(
    source: nn.Module, target: nn.Module, encoder_layers: Sequence[int], decoder_layers: Sequence[int]
) -> None:
    """Copy everything but the feed-forward projections from `source` into `target` (both T5-shaped models).

    That is the shared embeddings, each of `EMBEDDING_PATHS` that `target` does not tie to them, each stack's final
    norm, and in each paired block (see `paired_blocks`) the attention sub-layers and the feed-forward layer norm.
    """
    target.shared.load_state_dict(source.shared.state_dict())
    for path in EMBEDDING_PATHS:
        target_module = target.get_submodule(path)
        if target_module.weight is not target.shared.weight:
            target_module.load_state_dict(source.get_submodule(path).state_dict())
    for stack in ("encoder", "decoder"):
        getattr(target, stack).final_layer_norm.load_state_dict(getattr(source, stack).final_layer_norm.state_dict())
    for _, _, source_block, target_block in paired_blocks(source, target, encoder_layers, decoder_layers):
        for source_layer, target_layer in zip(source_block.layer[:-1], target_block.layer[:-1], strict=True):
            target_layer.load_state_dict(source_layer.state_dict())
        target_block.layer[-1].layer_norm.load_state_dict(source_block.layer[-1].layer_norm.state_dict())
