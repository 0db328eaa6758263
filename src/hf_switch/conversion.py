"""Interoperability with transformers' own `SwitchTransformers` checkpoints (the `google/switch-*` layout).

transformers keeps one `nn.Linear` per expert (`mlp.experts.expert_{e}.wi.weight`, `[d_ff, d_model]`); hf_switch
stacks them (`mlp.experts.wi`, `[E, d_ff, d_model]`). The rest of the module tree is the same, so one registered
checkpoint conversion stacks them on load, and `save_as_switch_transformers` unstacks them.
"""

import os

from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import MergeModulelist, WeightConverter

from .configuration_switch import SwitchConfig, require
from .modeling_switch import SwitchForConditionalGeneration


def _expert_weight_converters() -> list[WeightConverter]:
    return [
        WeightConverter(
            source_patterns=f".experts.expert_*.{name}.weight",
            target_patterns=f".experts.{name}",
            operations=[MergeModulelist(dim=0)],
        )
        for name in ("wi", "wo")
    ]


def register_checkpoint_conversion() -> None:
    """Let `from_pretrained` stack transformers' per-expert weights (idempotent)."""
    register_checkpoint_conversion_mapping(SwitchConfig.model_type, _expert_weight_converters(), overwrite=True)


def switch_config_from_transformers(config: SwitchTransformersConfig) -> SwitchConfig:
    """The `SwitchConfig` that computes what a transformers `SwitchTransformersConfig` computes."""
    return SwitchConfig(**SwitchConfig.dict_from_switch_transformers(config.to_dict()))


def transformers_config_from_switch(config: SwitchConfig) -> SwitchTransformersConfig:
    """The transformers `SwitchTransformersConfig` of a model; raises where transformers cannot express it."""
    unsupported = {
        "feed_forward_proj": (config.is_gated_act, "a non-gated activation (transformers' experts are not gated)"),
        "router_top_k": (config.router_top_k != 1, "1 (transformers routes top-1 only)"),
        "encoder_router_type": (
            config.encoder_router_type != "tokens_choose",
            "'tokens_choose' (transformers' routers are token-choice)",
        ),
        "routing_group": (config.routing_group != "sequence", "'sequence' (transformers routes each sequence alone)"),
        "expert_capacity": (
            config.expert_capacity is None,
            "an absolute capacity (transformers has no capacity factor and no dropless routing)",
        ),
        "router_ignore_padding_tokens": (
            config.router_ignore_padding_tokens,
            "False (transformers routes padding tokens)",
        ),
    }
    capacity_fields = ("routing_group", "expert_capacity", "router_ignore_padding_tokens")
    for field, (is_unsupported, allowed) in unsupported.items():
        if is_unsupported:
            way_out = (
                " Converting with an absolute capacity per sequence (`save_as_switch_transformers(..., "
                "expert_capacity=N)`, `hf-switch convert --expert_capacity N`) sets all three of "
                f"{', '.join(capacity_fields)}."
                if field in capacity_fields
                else ""
            )
            raise ValueError(
                f"SwitchConfig.{field}={getattr(config, field)!r} has no transformers equivalent: it must be "
                f"{allowed}.{way_out}"
            )
    shared = {
        k: v
        for k, v in config.to_dict().items()
        if k in SwitchTransformersConfig.__dataclass_fields__ and k not in ("model_type", "architectures")
    }
    shared["dense_act_fn"] = config.dense_act_fn
    # Not a SwitchTransformersConfig field, but its `_shift_right` and `generate` read it.
    shared["decoder_start_token_id"] = config.decoder_start_token_id
    return SwitchTransformersConfig(**shared)


def unstack_experts(state_dict: dict) -> dict:
    """transformers' per-expert keys for stacked experts: `...experts.wi` -> `...experts.expert_{e}.wi.weight`."""
    unstacked = {}
    for key, tensor in state_dict.items():
        prefix, _, name = key.rpartition(".")
        if prefix.endswith(".experts") and name in ("wi", "wo"):
            unstacked.update({f"{prefix}.expert_{e}.{name}.weight": weight for e, weight in enumerate(tensor)})
        else:
            unstacked[key] = tensor
    return unstacked


def save_as_switch_transformers(
    model: SwitchForConditionalGeneration, save_directory: str | os.PathLike, expert_capacity: int | None = None
) -> None:
    """Write `model` as a transformers `SwitchTransformersForConditionalGeneration` folder.

    The unstacked weights are loaded strictly into transformers' class, so a key or shape that does not fit raises
    instead of being dropped.

    Args:
        expert_capacity: for a model that transformers' router cannot express as it is (batch routing groups,
            capacity factors or dropless routing, padding kept out of routing), the absolute capacity per expert and
            sequence that the converted model gets; it then routes each sequence alone and routes padding, as
            transformers does. A capacity of at least the longest sequence drops no token.
    """
    config = model.config
    if expert_capacity is not None:
        require(expert_capacity >= 1, "expert_capacity", expert_capacity, "a positive integer")
        config = SwitchConfig.from_dict(
            {
                **config.to_dict(),
                "expert_capacity": expert_capacity,
                "routing_group": "sequence",
                "router_ignore_padding_tokens": False,
            }
        )
    reference = SwitchTransformersForConditionalGeneration(transformers_config_from_switch(config))
    state_dict = model.state_dict()
    expert_biases = [key for key in state_dict if key.endswith(".router.expert_bias")]
    for key in expert_biases:
        if state_dict[key].any():
            raise ValueError(
                f"{key} is not zero: transformers' router has no expert bias (SwitchConfig.router_expert_bias), so "
                "the converted model would choose other experts than this one. Only a model whose expert biases are "
                "all zero converts."
            )
        del state_dict[key]
    reference.load_state_dict(unstack_experts(state_dict), strict=True)
    reference.save_pretrained(save_directory)
