"""Sparse upcycling (Komatsuzaki et al. 2022): a dense T5 becomes a Switch model that starts where it left off.

Each sparse layer's experts start as copies of the dense feed-forward they replace, and its router starts fresh.

Switch multiplies a token's expert output by the router's probability for that expert, so with copied experts the
layer computes `p * FFN(x)`; a fresh router gives `p` close to `1/E`, and plain copies would shrink every sparse
feed-forward to about `FFN(x) / E`. The default compensates in two steps:

1. The router's initial weights are its usual ones (normal, std `sqrt(0.1 / d_model)`) scaled by
   `router_init_scale` (1e-3): for a layer-normed input of unit RMS the logits then spread by about 3e-4, so every
   probability is `1/E` to that relative precision, yet the weights stay random, so tokens spread over the experts
   and the experts' symmetry breaks. (A zero router would give exactly `1/E`, but
   would send every token to one expert by tie-breaking, and its other rows would get identical gradients forever.)
2. Each copy's output projection `wo` is multiplied by `E` for top-1 routing, so that `(1/E) * E * FFN(x)` is the
   dense output. With `router_top_k > 1` the chosen experts' weights are renormalised to sum to 1, and identical
   experts sum to the dense output for any router, so no scale is needed.

With evaluation routing that drops nothing (`eval_capacity_factor=None` unless overridden), the upcycled model's
eval-mode outputs equal the dense model's up to the router's 1e-3 spread: its cross-entropy agrees to about 1e-4 or
better. Its `loss` adds the router losses, which at init are a constant: per sparse layer, `router_aux_loss_coef`
(the load-balancing loss is 1 when every probability is `1/E`) plus `router_z_loss_coef * log(E)^2`.

Once training starts the router learns and its probabilities move away from `1/E`, while the factor `E` stays in
`wo`: a top-1 expert contributes `E * p * FFN_e(x)`, up to `E` times the dense scale for a router sure of its choice.
The experts' weights adapt along with the router (gradient descent sees the product), and the z-loss keeps the
router's logits small, but a short learning-rate warm-up after upcycling is advisable. Training routing keeps the
config's capacity factor (1.25 by default), so tokens beyond capacity skip the feed-forward from the first step;
pass `capacity_factor=None` for dropless training.
"""

import os

import torch
from transformers import T5ForConditionalGeneration

from .configuration_switch import SwitchConfig, require
from .modeling_switch import SwitchForConditionalGeneration
from .t5_transfer import (
    T5_ARCHITECTURE_FIELDS,
    copy_non_ffn_weights,
    feed_forward_weight_names,
    paired_blocks,
    shared_config_fields,
)


def _load_dense(dense_t5) -> T5ForConditionalGeneration:
    if isinstance(dense_t5, (str, os.PathLike)):
        dense_t5 = T5ForConditionalGeneration.from_pretrained(dense_t5)
    if not isinstance(dense_t5, T5ForConditionalGeneration):
        raise TypeError(
            f"dense_t5: expected a transformers T5ForConditionalGeneration or a folder path, got "
            f"{type(dense_t5).__name__}."
        )
    return dense_t5


def _switch_config(dense: T5ForConditionalGeneration, overrides: dict) -> SwitchConfig:
    """The Switch config with the dense model's architecture, dropless in evaluation unless overridden."""
    head_is_tied = dense.lm_head.weight is dense.shared.weight or torch.equal(dense.lm_head.weight, dense.shared.weight)
    if dense.config.scale_decoder_outputs and not head_is_tied:
        # hf_switch scales the decoder output exactly when it ties the head to the embeddings.
        raise ValueError(
            "dense_t5: scales its decoder output (scale_decoder_outputs=True) but has a language-model head distinct "
            "from its embeddings, which a SwitchConfig cannot express (tie_word_embeddings means both or neither)."
        )
    fields = shared_config_fields(dense.config)
    fields.update(tie_word_embeddings=dense.config.scale_decoder_outputs, eval_capacity_factor=None)
    fields.update(overrides)
    return SwitchConfig(**fields)


def _every_other(num_sparse_layers: int | None, num_layers: int) -> int:
    """`num_sparse_layers`, or by default half the layers (every other one, from the second)."""
    return num_layers // 2 if num_sparse_layers is None else num_sparse_layers


def _expert_state(dense_mlp, names, num_experts: int, output_scale: float) -> dict[str, torch.Tensor]:
    """Stacked expert weights `[E, out, in]`: `E` copies of a dense feed-forward, `wo` times `output_scale`."""
    state = {}
    for name in names:
        weight = getattr(dense_mlp, name).weight  # [out, in]
        state[name] = weight.expand(num_experts, *weight.shape) * (output_scale if name == "wo" else 1.0)
    return state


@torch.no_grad()
def upcycle(
    dense_t5: T5ForConditionalGeneration | str | os.PathLike,
    num_experts: int = 8,
    num_sparse_encoder_layers: int | None = None,
    num_sparse_decoder_layers: int | None = None,
    router_init_scale: float = 1e-3,
    **switch_config_overrides,
) -> SwitchForConditionalGeneration:
    """A Switch model whose experts start as copies of a dense T5's feed-forward layers (see the module docstring).

    Args:
        dense_t5: a `T5ForConditionalGeneration`, or a folder it loads from.
        num_experts: experts per sparse layer.
        num_sparse_encoder_layers, num_sparse_decoder_layers: sparse layers per stack, placed as `SwitchConfig`
            places them (every other layer for half the layers); `None` makes every other layer sparse.
        router_init_scale: factor on the router's usual initial weights, > 0; small keeps the outputs at init equal
            to the dense model's.
        switch_config_overrides: any other `SwitchConfig` field (capacity, top-k, router losses, ...). The
            architecture comes from `dense_t5`; `eval_capacity_factor` defaults to None (dropless).

    Returns:
        A `SwitchForConditionalGeneration` on the dense model's device and dtype, in its train/eval mode.
    """
    dense = _load_dense(dense_t5)
    require(
        router_init_scale > 0,
        "router_init_scale",
        router_init_scale,
        "a number > 0 (a zero router never breaks the symmetry between experts)",
    )
    fixed = sorted(set(switch_config_overrides) & {*T5_ARCHITECTURE_FIELDS, "tie_word_embeddings"})
    if fixed:
        raise ValueError(
            f"switch_config_overrides: {fixed} are invalid: the architecture comes from dense_t5, whose weights are "
            "copied."
        )
    sparse_layers = {
        "num_sparse_encoder_layers": _every_other(num_sparse_encoder_layers, dense.config.num_layers),
        "num_sparse_decoder_layers": _every_other(num_sparse_decoder_layers, dense.config.num_decoder_layers),
    }
    config = _switch_config(dense, {"num_experts": num_experts, **sparse_layers, **switch_config_overrides})
    model = SwitchForConditionalGeneration(config).to(device=dense.device, dtype=dense.dtype)
    encoder_layers, decoder_layers = range(config.num_layers), range(config.num_decoder_layers)
    copy_non_ffn_weights(dense, model, encoder_layers, decoder_layers)

    output_scale = config.num_experts if config.router_top_k == 1 else 1.0
    names = feed_forward_weight_names(config)
    for _, _, dense_block, switch_block in paired_blocks(dense, model, encoder_layers, decoder_layers):
        dense_mlp, switch_ff = dense_block.layer[-1].DenseReluDense, switch_block.layer[-1]
        if switch_ff.is_sparse:
            switch_ff.mlp.experts.load_state_dict(_expert_state(dense_mlp, names, config.num_experts, output_scale))
            switch_ff.mlp.router.classifier.weight.mul_(router_init_scale)
        else:
            switch_ff.mlp.load_state_dict(dense_mlp.state_dict())
    return model.train(dense.training)


__all__ = ["upcycle"]
