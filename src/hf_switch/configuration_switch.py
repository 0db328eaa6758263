"""Configuration of Switch Transformers (Fedus, Zoph & Shazeer, 2021) for hf_switch."""

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

FEED_FORWARD_PROJECTIONS = ("relu", "gelu", "gated-relu", "gated-gelu", "gated-silu")
ROUTER_DTYPES = ("float32", "float16", "bfloat16")
ROUTING_GROUPS = ("sequence", "batch")
LOAD_BALANCING_SCOPES = ("group", "global_batch")
ROUTER_TYPES = ("tokens_choose", "experts_choose")


def require(condition: bool, name: str, value, allowed: str, owner: str = "") -> None:
    """Raise a `ValueError` that names the field or argument, the value it got and what is allowed."""
    if not condition:
        raise ValueError(f"{owner}{name}={value!r} is invalid: {name} must be {allowed}.")


def _require(condition: bool, field: str, value, allowed: str) -> None:
    require(condition, field, value, allowed, owner="SwitchConfig.")


def sparse_layer_indices(num_layers: int, num_sparse_layers: int) -> list[int]:
    """Indices of the sparse layers in a stack, placed as transformers' SwitchTransformers places them.

    The sparse step is `num_layers // num_sparse_layers`; with a step of 1 every layer is sparse, otherwise the
    layers `i` with `i % step == 1` are (layers 1, 3, 5, ... for a step of 2).
    """
    if num_sparse_layers == 0:
        return []
    step = num_layers // num_sparse_layers
    return [i for i in range(num_layers) if step == 1 or i % step == 1]


@strict
class SwitchConfig(PreTrainedConfig):
    r"""
    Configuration of a [`SwitchForConditionalGeneration`]: a T5-style encoder-decoder in which every
    `num_layers // num_sparse_encoder_layers`-th feed-forward layer is a mixture of experts with top-k routing.

    Field names follow transformers' `SwitchTransformersConfig` where they overlap, so that its `config.json` files
    load (see [`SwitchConfig.from_switch_transformers`]). Defaults follow the paper where it differs from
    transformers: aux loss coefficient 1e-2, z-loss coefficient 1e-3, router in float32, capacity factor 1.25 in
    training, routing groups of the whole batch (as the paper's groups of many sequences), and evaluation that
    drops no token (so a sequence's output does not depend on the batch it is in).

    Args:
        vocab_size: Size of the token vocabulary.
        d_model: Width of the residual stream.
        d_kv: Width of one attention head.
        d_ff: Hidden width of each feed-forward layer and of each expert.
        num_layers: Number of encoder layers.
        num_decoder_layers: Number of decoder layers (defaults to `num_layers`).
        num_heads: Number of attention heads.
        num_experts: Number of experts in each sparse layer.
        num_sparse_encoder_layers: Number of sparse layers in the encoder (0 for a dense encoder); `None` (the
            default) makes every other layer sparse, `max(1, num_layers // 2)` layers.
        num_sparse_decoder_layers: Number of sparse layers in the decoder (0 for a dense decoder); `None` (the
            default) makes every other layer sparse, `max(1, num_decoder_layers // 2)` layers.
        routing_group: What one routing group is, the tokens that expert capacity and the load-balancing loss are
            counted over: "batch" (all tokens of a forward on this rank), "sequence" (each sequence alone:
            transformers' semantics, short sequences get few slots per expert), or a positive integer (groups of
            that many tokens, mesh-tf's `group_size`). Queues within a group are position-major: position 0 of
            every sequence, then position 1, and so on.
        expert_capacity: Absolute number of token slots per expert and routing group. When set it takes precedence
            over the capacity factors, in training and evaluation alike (this is transformers' semantics).
        capacity_factor: Slots per expert in training, as a multiple of the group's balanced share
            `router_top_k * tokens / num_experts`. `None` with `expert_capacity=None` routes without dropping.
        eval_capacity_factor: The same in evaluation (`model.eval()`, `generate()`); `None` (the default) routes
            without dropping, so outputs do not depend on the batch.
        min_expert_capacity: Lower bound on the capacity a factor gives.
        router_top_k: Number of experts each token is sent to (1 in the paper), in token-choice layers.
        encoder_router_type: How the encoder's sparse layers route: "tokens_choose" (each token picks its top-k
            experts, as in the paper) or "experts_choose" (expert-choice routing, Zhou et al. 2022: each expert takes
            the tokens of its routing group that score it highest, up to `expert_choice_capacity_factor * n / E`
            of a group's `n` tokens; balanced by construction, no load-balancing loss or expert bias, and a token
            that no expert takes passes through the residual as a dropped token does).
        decoder_router_type: The same for the decoder; only "tokens_choose", since an expert that chooses among a
            group's tokens sees later positions, which an autoregressive decoder cannot.
        expert_choice_capacity_factor: Tokens each expert takes in an "experts_choose" layer, as a multiple of the
            group's balanced share `n / E`; 1.0 gives the compute of top-1 token choice, 2.0 that of top-2. The same in
            training and evaluation: with groups that span sequences, a sequence's encoding then depends on its batch
            (`routing_group="sequence"` avoids that).
        router_bias: Whether the router's projection has a bias.
        router_jitter_noise: Width of the multiplicative uniform noise on the router input in training.
        router_dtype: Precision of the router computation ("selective precision" in the paper).
        router_ignore_padding_tokens: Whether padding tokens are kept out of routing, capacity and router losses.
        router_z_loss_coef: Weight of the router z-loss in the training loss.
        router_check_finite: Whether every forward checks that the router logits are finite and raises a
            `FloatingPointError` naming the layer when they hold NaN or inf. The check costs one host-device
            synchronisation per stack; turn it off for speed once training is known to be stable.
        router_aux_loss_coef: Weight of the load-balancing loss in the training loss.
        load_balancing_scope: Which tokens the load-balancing loss's expert fractions `f_e` count: "group" (each
            routing group's own), or "global_batch" (in training, every micro-batch of the optimizer step so far on
            every data-parallel process; Qiu et al. 2025). See `routing.end_balancing_step`.
        router_expert_bias: Whether each sparse layer keeps a per-expert bias that is added to the router
            probabilities to choose the experts, never to weight their outputs (auxiliary-loss-free balancing, Wang et
            al. 2024). It takes no gradient: after each optimizer step the bias of every expert that received fewer
            routed choices than the mean rises by `router_bias_update_rate`, and that of every busier expert falls
            by it. Use it alone (`router_aux_loss_coef=0`) or next to the load-balancing loss. Saved with the model.
        router_bias_update_rate: Step of the expert bias per optimizer step (`u` in Wang et al. 2024); 0 freezes it.
        expert_dropout: Dropout inside the experts (the paper finetunes with 0.4); `None` uses `dropout_rate`.
        expert_parallel_size: Number of ranks the experts of each layer are sharded over.
        relative_attention_num_buckets: Number of relative position buckets.
        relative_attention_max_distance: Largest distinguished relative distance.
        dropout_rate: Dropout everywhere outside the experts.
        layer_norm_epsilon: Epsilon of the RMS layer norms.
        feed_forward_proj: Feed-forward activation: "relu", "gelu", or a gated "gated-relu", "gated-gelu",
            "gated-silu" (as in T5).
        initializer_factor: Scale of all initial weights.

    In a decoder outside training, an `eval_capacity_factor` applies to each prefix: a token at position `t` is kept
    if its expert received no more than `ceil(top_k * factor * n_t / num_experts)` tokens (and at least
    `min_expert_capacity`) of the group's `n_t` tokens at positions up to and including `t`. This is causal, so
    decoding with a cache routes exactly as a forward pass over the whole sequence does. Beam search reorders the
    sequences of a batch, so with groups that span sequences and capacity in evaluation it is refused.
    """

    model_type = "hf_switch"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "head_dim": "d_kv",
    }

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 12
    num_decoder_layers: int | None = None
    num_heads: int = 12
    num_experts: int = 8
    num_sparse_encoder_layers: int | None = None
    num_sparse_decoder_layers: int | None = None
    routing_group: str | int = "batch"
    expert_capacity: int | None = None
    capacity_factor: float | int | None = 1.25
    eval_capacity_factor: float | int | None = None
    min_expert_capacity: int = 4
    router_top_k: int = 1
    encoder_router_type: str = "tokens_choose"
    decoder_router_type: str = "tokens_choose"
    expert_choice_capacity_factor: float | int = 1.0
    router_bias: bool = False
    router_jitter_noise: float | int = 0.01
    # A plain str, validated in validate_switch, so that an error quotes the value (strict's Literal check does not).
    router_dtype: str = "float32"
    router_ignore_padding_tokens: bool = False
    router_check_finite: bool = True
    router_z_loss_coef: float | int = 1e-3
    router_aux_loss_coef: float | int = 1e-2
    load_balancing_scope: str = "group"
    router_expert_bias: bool = False
    router_bias_update_rate: float | int = 1e-3
    expert_dropout: float | int | None = None
    expert_parallel_size: int = 1
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float | int = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    initializer_factor: float | int = 1.0
    tie_word_embeddings: bool = True
    is_encoder_decoder: bool = True
    use_cache: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = 0
    is_decoder: bool = False

    def __post_init__(self, **kwargs):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        # Every other layer sparse, for whatever depth is configured.
        if self.num_sparse_encoder_layers is None:
            self.num_sparse_encoder_layers = max(1, self.num_layers // 2)
        if self.num_sparse_decoder_layers is None:
            self.num_sparse_decoder_layers = max(1, self.num_decoder_layers // 2)
        # T5's layer classes read these two derived attributes.
        self.is_gated_act = self.feed_forward_proj.startswith("gated-")
        self.dense_act_fn = (
            "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]
        )
        super().__post_init__(**kwargs)

    def validate_switch(self):
        """Check every field's range; each error names the field, its value and what is allowed."""
        for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads"):
            value = getattr(self, field)
            _require(value >= 1, field, value, "a positive integer")
        _require(self.num_experts >= 1, "num_experts", self.num_experts, "a positive integer")
        for field, layers in (
            ("num_sparse_encoder_layers", self.num_layers),
            ("num_sparse_decoder_layers", self.num_decoder_layers),
        ):
            value = getattr(self, field)
            _require(0 <= value <= layers, field, value, f"between 0 and the stack's {layers} layers")
            placed = len(sparse_layer_indices(layers, value))
            _require(
                placed == value,
                field,
                value,
                f"a count that the sparse step (layers // count) places exactly; with {layers} layers it places "
                f"{placed}, so use a divisor of {layers}",
            )
        _require(
            self.routing_group in ROUTING_GROUPS or (type(self.routing_group) is int and self.routing_group >= 1),
            "routing_group",
            self.routing_group,
            f"one of {ROUTING_GROUPS} or a positive number of tokens",
        )
        _require(
            self.load_balancing_scope in LOAD_BALANCING_SCOPES,
            "load_balancing_scope",
            self.load_balancing_scope,
            f"one of {LOAD_BALANCING_SCOPES}",
        )
        if self.expert_capacity is not None:
            _require(self.expert_capacity >= 1, "expert_capacity", self.expert_capacity, "a positive integer or None")
        for field in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, field)
            if value is not None:
                _require(math.isfinite(value) and value > 0, field, value, "a finite number > 0, or None (dropless)")
        _require(self.min_expert_capacity >= 1, "min_expert_capacity", self.min_expert_capacity, "a positive integer")
        _require(
            1 <= self.router_top_k <= self.num_experts,
            "router_top_k",
            self.router_top_k,
            f"between 1 and num_experts={self.num_experts}",
        )
        _require(
            math.isfinite(self.router_jitter_noise) and 0 <= self.router_jitter_noise < 1,
            "router_jitter_noise",
            self.router_jitter_noise,
            "a number in [0, 1)",
        )
        _require(
            self.encoder_router_type in ROUTER_TYPES,
            "encoder_router_type",
            self.encoder_router_type,
            f"one of {ROUTER_TYPES}",
        )
        _require(
            self.decoder_router_type == "tokens_choose",
            "decoder_router_type",
            self.decoder_router_type,
            "'tokens_choose': in an 'experts_choose' layer each expert picks among its group's tokens, later "
            "positions included, which an autoregressive decoder cannot see when it generates (use it for the "
            "encoder: encoder_router_type)",
        )
        _require(
            math.isfinite(self.expert_choice_capacity_factor) and self.expert_choice_capacity_factor > 0,
            "expert_choice_capacity_factor",
            self.expert_choice_capacity_factor,
            "a finite number > 0",
        )
        _require(self.router_dtype in ROUTER_DTYPES, "router_dtype", self.router_dtype, f"one of {ROUTER_DTYPES}")
        for field in ("router_z_loss_coef", "router_aux_loss_coef", "router_bias_update_rate"):
            value = getattr(self, field)
            _require(math.isfinite(value) and value >= 0, field, value, "a finite number >= 0")
        for field in ("dropout_rate", "expert_dropout"):
            value = getattr(self, field)
            if value is not None:
                _require(math.isfinite(value) and 0 <= value < 1, field, value, "a number in [0, 1)")
        _require(
            self.expert_parallel_size >= 1 and self.num_experts % self.expert_parallel_size == 0,
            "expert_parallel_size",
            self.expert_parallel_size,
            f"a positive divisor of num_experts={self.num_experts}",
        )
        for field in ("relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, field)
            _require(value >= 2, field, value, "an integer >= 2")
        _require(
            math.isfinite(self.layer_norm_epsilon) and self.layer_norm_epsilon > 0,
            "layer_norm_epsilon",
            self.layer_norm_epsilon,
            "a finite number > 0",
        )
        _require(
            self.feed_forward_proj in FEED_FORWARD_PROJECTIONS,
            "feed_forward_proj",
            self.feed_forward_proj,
            f"one of {FEED_FORWARD_PROJECTIONS}",
        )
        _require(
            math.isfinite(self.initializer_factor) and self.initializer_factor > 0,
            "initializer_factor",
            self.initializer_factor,
            "a finite number > 0",
        )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """Read a `config.json`; one of transformers' `switch_transformers` is translated into this config's fields.

        A config of any other model type is refused: its fields would silently fall back to Switch defaults.
        """
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type == "switch_transformers":
            config_dict = cls.dict_from_switch_transformers(config_dict)
        elif model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path}: its config.json has model_type={model_type!r}, but SwitchConfig "
                f"loads model_type {cls.model_type!r} or transformers' 'switch_transformers'. A dense T5 becomes a "
                "Switch model with hf_switch.upcycle (`hf-switch upcycle`)."
            )
        return config_dict, kwargs

    @classmethod
    def dict_from_switch_transformers(cls, config_dict: dict) -> dict:
        """Fields of this config equivalent to a transformers `SwitchTransformersConfig` (as a dict).

        transformers' router routes each sequence as a group, always uses the absolute `expert_capacity`, never ignores
        padding, and its experts are never gated; the translated config says so explicitly.
        """
        from transformers import SwitchTransformersConfig

        reference = SwitchTransformersConfig(**{k: v for k, v in config_dict.items() if k != "model_type"})
        translated = {k: v for k, v in reference.to_dict().items() if k in cls.__dataclass_fields__}
        translated.pop("model_type", None)
        translated.pop("architectures", None)
        for field, layers, step in (
            ("num_sparse_encoder_layers", reference.num_layers, reference.encoder_sparse_step),
            ("num_sparse_decoder_layers", reference.num_decoder_layers, reference.decoder_sparse_step),
        ):
            # transformers places sparse layers by its step alone; count what it places (even for a count of 0).
            translated[field] = sum(1 for i in range(layers) if step == 1 or i % step == 1)
        translated.update(
            feed_forward_proj=reference.dense_act_fn,
            routing_group="sequence",
            capacity_factor=None,
            eval_capacity_factor=None,
            router_ignore_padding_tokens=False,
        )
        return translated

    @property
    def sparse_encoder_layers(self) -> list[int]:
        """Indices of the encoder layers whose feed-forward is a mixture of experts."""
        return sparse_layer_indices(self.num_layers, self.num_sparse_encoder_layers)

    @property
    def sparse_decoder_layers(self) -> list[int]:
        """Indices of the decoder layers whose feed-forward is a mixture of experts."""
        return sparse_layer_indices(self.num_decoder_layers, self.num_sparse_decoder_layers)

    @property
    def experts_dropout_rate(self) -> float:
        """Dropout applied inside the experts."""
        return self.dropout_rate if self.expert_dropout is None else self.expert_dropout


__all__ = ["SwitchConfig"]
