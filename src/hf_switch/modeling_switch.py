"""Switch Transformers: a T5 encoder-decoder whose feed-forward layers are, every few layers, a mixture of experts.

Attention, layer norms and dense feed-forward layers are transformers' own T5 modules; this file adds the sparse
feed-forward layer (router -> group tokens by expert -> experts -> combine), the stacks that collect routing losses
and statistics, and the model classes. Shapes: `B` batch, `T` sequence length, `d` d_model, `E` experts.
"""

import copy
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.generation import GenerationMixin, GenerationMode
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.models.t5.modeling_t5 import (
    T5Attention,
    T5DenseActDense,
    T5DenseGatedActDense,
    T5LayerCrossAttention,
    T5LayerNorm,
    T5LayerSelfAttention,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .cache import SwitchCache
from .checkpoints import check_stored_dtypes, read_safetensors_header, swap_into_place, verify_loaded_keys
from .configuration_switch import SwitchConfig
from .experts import TRANSFORMERS_EXPERTS, SwitchExperts, check_experts_implementation, group_by_expert
from .routing import RouterDecision, RoutingStats, SwitchRouter, chosen_expert_counts, routing_stats


class SwitchSparseMLP(nn.Module):
    """Mixture-of-experts feed-forward: route, group tokens by expert, run the experts, combine.

    A token that no expert takes (dropped by capacity, or ignored padding) gets zeros here, so it passes through
    the layer's residual connection unchanged. With `expert_parallel_size > 1` the experts are spread over the ranks
    of an expert-parallel group and tokens travel to them by all-to-all (`expert_parallel.ExpertParallelExperts`).
    """

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.config = config  # the stack's, which `set_experts_implementation` updates in place
        self.router = SwitchRouter(config)
        if config.expert_parallel_size > 1:
            # The same contract with the experts spread over ranks; imported here since it needs deepspeed.
            from .expert_parallel import ExpertParallelExperts

            self.experts = ExpertParallelExperts(config)
        else:
            self.experts = SwitchExperts(config)

    def forward(self, hidden_states, token_mask, causal=False, past_expert_index=None):
        """`hidden_states` `[B, T, d]`, `token_mask` `[B, T]` -> (`[B, T, d]`, `RouterDecision`)."""
        batch, length, width = hidden_states.shape
        decision = self.router(hidden_states, token_mask, causal=causal, past_expert_index=past_expert_index)
        top_k = decision.expert_index.shape[-1]
        pairs = (
            decision.expert_index.reshape(-1, top_k),
            decision.expert_weight.to(hidden_states.dtype).reshape(-1, top_k),
            decision.kept.reshape(-1, top_k),
        )
        tokens = hidden_states.reshape(-1, width)
        implementation = self.config._experts_implementation
        if torch.compiler.is_exporting() and implementation not in TRANSFORMERS_EXPERTS:
            raise ValueError(
                f"torch.export with experts_implementation={implementation!r}: hf_switch's expert kernels size each "
                "expert's group from the routing, which an exported graph cannot hold; export with "
                "model.set_experts_implementation('batched_mm') (or 'grouped_mm'): the same outputs, static shapes."
            )
        if implementation in TRANSFORMERS_EXPERTS:
            output = self.experts.forward_pairs(implementation, tokens, *pairs)
        else:
            output = self.experts(tokens, group_by_expert(*pairs, self.config.num_experts))
        return output.reshape(batch, length, width), decision


class SwitchLayerFF(nn.Module):
    """Pre-norm feed-forward sub-layer with a residual connection; dense (T5's) or sparse."""

    def __init__(self, config: SwitchConfig, is_sparse: bool):
        super().__init__()
        self.is_sparse = is_sparse
        if is_sparse:
            self.mlp = SwitchSparseMLP(config)
        elif config.is_gated_act:
            self.mlp = T5DenseGatedActDense(config)
        else:
            self.mlp = T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states, token_mask, causal=False, past_expert_index=None):
        """`[B, T, d]` -> (`[B, T, d]`, `RouterDecision` or None for a dense layer)."""
        normed = self.layer_norm(hidden_states)
        decision = None
        if self.is_sparse:
            normed, decision = self.mlp(normed, token_mask, causal=causal, past_expert_index=past_expert_index)
        else:
            normed = self.mlp(normed)
        return hidden_states + self.dropout(normed), decision


class SwitchBlock(GradientCheckpointingLayer):
    """One layer: self-attention, cross-attention (decoder only), feed-forward."""

    def __init__(self, config: SwitchConfig, has_relative_attention_bias: bool, is_sparse: bool, layer_idx: int):
        super().__init__()
        self.is_decoder = config.is_decoder
        self.layer_idx = layer_idx
        self.layer = nn.ModuleList(
            [T5LayerSelfAttention(config, has_relative_attention_bias=has_relative_attention_bias, layer_idx=layer_idx)]
        )
        if self.is_decoder:
            self.layer.append(T5LayerCrossAttention(config, layer_idx=layer_idx))
        self.layer.append(SwitchLayerFF(config, is_sparse=is_sparse))

    @property
    def is_sparse(self) -> bool:
        return self.layer[-1].is_sparse

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_bias=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        encoder_decoder_position_bias=None,
        token_mask=None,
        cache=None,
        **kwargs,
    ):
        """`[B, T, d]` -> (`[B, T, d]`, self-attention bias, cross-attention bias, `RouterDecision` or None, its
        `[B, T, E]` router logits or None).

        The router logits also travel as an output of their own: reentrant activation checkpointing reconnects only
        the tensors a layer returns, and the router losses need the logits' gradient path (`RouterDecision.rejoined`).
        """
        hidden_states, position_bias, _ = self.layer[0](
            hidden_states, attention_mask=attention_mask, position_bias=position_bias, cache=cache, **kwargs
        )
        if self.is_decoder and encoder_hidden_states is not None:
            hidden_states, encoder_decoder_position_bias, _ = self.layer[1](
                hidden_states,
                key_value_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                position_bias=encoder_decoder_position_bias,
                cache=cache,
                **kwargs,
            )
        past_expert_index = None
        if self.is_sparse and isinstance(cache, SwitchCache):
            past_expert_index = cache.routed_experts(self.layer_idx)
        hidden_states, decision = self.layer[-1](
            hidden_states, token_mask, causal=self.is_decoder, past_expert_index=past_expert_index
        )
        if decision is not None and isinstance(cache, SwitchCache):
            cache.record_routing(self.layer_idx, decision.expert_index, decision.token_mask)
        router_logits = None if decision is None else decision.logits
        return hidden_states, position_bias, encoder_decoder_position_bias, decision, router_logits


@dataclass
class SwitchStackOutput(ModelOutput):
    """Output of an encoder or decoder stack.

    Args:
        last_hidden_state: `[B, T, d]`.
        cache: the decoder's `SwitchCache` when caching.
        hidden_states, attentions, cross_attentions: as in T5, on request.
        routing: one `RoutingStats` per sparse layer (losses, router logits, expert load), None when not computed
            (`output_routing_stats=False`). A tuple rather than tensors, so that `generate()` leaves it alone when it
            repeats encoder outputs for beams.
    """

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    routing: tuple[RoutingStats, ...] | None = None


@dataclass
class SwitchEncoderOutput(ModelOutput):
    """Output of [`SwitchEncoderModel`]: tensors only, so that `return_dict=False` tuples can be traced.

    Args:
        last_hidden_state: `[B, T, d]`.
        hidden_states, attentions: as in T5, on request.
        aux_loss: scalar, sum over the sparse layers of the load-balancing loss (0 without sparse layers).
        z_loss: scalar, sum over the sparse layers of the router z-loss.
        router_logits: per sparse layer `[B, T, E]`, with `output_router_logits`.
        expert_counts: `[num_sparse_layers, E]` token slots each expert filled.
        dropped_fraction: `[num_sparse_layers]` routed slots dropped by capacity.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    expert_counts: torch.Tensor | None = None
    dropped_fraction: torch.Tensor | None = None


@dataclass
class SwitchSeq2SeqOutput(ModelOutput):
    """Output of [`SwitchModel`] and [`SwitchForConditionalGeneration`].

    Args:
        loss: scalar, cross-entropy + aux_coef * (encoder + decoder aux loss) + z_coef * (encoder + decoder z-loss),
            when `labels` are given.
        logits: `[B, T_dec, vocab_size]` (language-model head only).
        last_hidden_state: `[B, T_dec, d]` (base model only).
        encoder_aux_loss, decoder_aux_loss: scalar, sum over the stack's sparse layers of the load-balancing loss
            (0 without sparse layers).
        encoder_z_loss, decoder_z_loss: scalar, sum over the stack's sparse layers of the router z-loss.
        encoder_router_logits, decoder_router_logits: per sparse layer `[B, T, E]`, with `output_router_logits`.
        encoder_expert_counts, decoder_expert_counts: `[num_sparse_layers, E]` token slots each expert filled.
        encoder_dropped_fraction, decoder_dropped_fraction: `[num_sparse_layers]` routed slots dropped by capacity.
        router_loss: scalar, the weighted router losses that `loss` includes (`loss - router_loss` is the
            cross-entropy, what a dense model's loss is), when `labels` are given.
        Other fields as in T5's `Seq2SeqLMOutput`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_aux_loss: torch.Tensor | None = None
    encoder_z_loss: torch.Tensor | None = None
    decoder_aux_loss: torch.Tensor | None = None
    decoder_z_loss: torch.Tensor | None = None
    encoder_router_logits: tuple[torch.Tensor, ...] | None = None
    decoder_router_logits: tuple[torch.Tensor, ...] | None = None
    encoder_expert_counts: torch.Tensor | None = None
    decoder_expert_counts: torch.Tensor | None = None
    encoder_dropped_fraction: torch.Tensor | None = None
    decoder_dropped_fraction: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None


class SwitchPreTrainedModel(PreTrainedModel):
    config: SwitchConfig
    base_model_prefix = "switch"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SwitchBlock"]
    # Selective precision: `from_pretrained(..., dtype=torch.bfloat16)` keeps the routers (projection, expert bias)
    # in float32; a model cast afterwards gets its router projection cast back on its first forward.
    _keep_in_fp32_modules_strict = ["router"]
    # The relative position bias is passed to the attention functions, which flash attention cannot take.
    _supports_flash_attn = False
    _supports_flex_attn = True
    _supports_sdpa = True
    # Routing is data-dependent (capacity, token grouping), which breaks full-graph capture.
    _can_compile_fullgraph = False
    _can_record_outputs = {
        "hidden_states": OutputRecorder(SwitchBlock, index=0),
        "attentions": OutputRecorder(T5LayerSelfAttention, index=-1),
        "cross_attentions": OutputRecorder(T5LayerCrossAttention, index=-1),
    }

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # transformers looks for its own decorator in the source; SwitchSparseMLP dispatches instead

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """`from_pretrained(..., experts_implementation=...)` and `set_experts_implementation`: hf_switch's kernels
        ("eager", the default) or transformers' `batched_mm` / `grouped_mm`; any other name is refused."""
        return check_experts_implementation(requested_experts, self.config)

    def set_experts_implementation(self, experts_implementation: str):
        """transformers' `set_experts_implementation`, reaching the encoder and decoder stacks, which hold copies of
        the config (transformers passes it on to sub-models only when their config class differs)."""
        super().set_experts_implementation(experts_implementation)
        for module in self.modules():
            if isinstance(module, SwitchPreTrainedModel):
                module.config._experts_implementation_internal = self.config._experts_implementation

    def save_pretrained(
        self, save_directory, is_main_process: bool = True, *args, save_original_format: bool = False, **kwargs
    ):
        """`PreTrainedModel.save_pretrained`, atomic, keeping the experts stacked by default.

        The folder is written as a hidden sibling `.NAME.saving-*` and renamed into place once complete, so a save
        killed midway leaves the previous folder as it was (and the hidden sibling behind). Files of the previous
        folder that this save does not write (a tokenizer, trainer checkpoints, logs) are kept, hard-linked into the
        new one; its weight files are not, so no stale shard outlives the save. Between the two renames that swap
        an existing folder (microseconds) the previous one is at `.NAME.previous-*`.

        transformers would otherwise revert the registered checkpoint conversion and write transformers' per-expert
        layout, which a remote-code load (no conversion registered) could not read back. Use
        `hf_switch.save_as_switch_transformers` to write a transformers `SwitchTransformers` folder.

        Under expert parallelism the folder holds every expert and says `expert_parallel_size=1`: it loads in one
        process, or under any expert-parallel size. Every rank must call it (the experts are gathered from the
        group), unless `state_dict` is already `expert_parallel.consolidated_state_dict(model)`; it returns on every
        rank once the folder is in place (when it gathered the experts itself).

        As in transformers, only global rank 0 writes when torch.distributed is initialised, whatever
        `is_main_process` says on the other ranks (`should_save_on_this_rank`).
        """
        if self.config.expert_parallel_size > 1:
            return self._save_expert_parallel(save_directory, is_main_process, *args, **kwargs)
        target = Path(save_directory)
        if not self.should_save_on_this_rank(is_main_process) or target.is_file():
            # Other ranks write nothing of their own here; transformers reports a file in the way.
            return super().save_pretrained(
                save_directory, is_main_process, *args, save_original_format=save_original_format, **kwargs
            )
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", target.name)  # the Hub repository is named after the folder, not the staging
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.saving-{uuid.uuid4().hex[:12]}")
        staging.mkdir()
        try:
            result = super().save_pretrained(
                staging, is_main_process, *args, save_original_format=save_original_format, **kwargs
            )
            swap_into_place(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, output_loading_info: bool = False, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict about what the checkpoint holds.

        transformers warns about missing weights and initialises them at random; a Switch model with a random router
        or random experts looks loaded but computes noise. Here a missing weight is an error (except an untied
        `lm_head`, which a task head may start fresh), and so is an unexpected router or expert weight (the
        checkpoint places experts where the config does not). A shape that does not fit raises in transformers.
        Weight files are checked before they are read (see `_load_pretrained_model`).
        """
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        verify_loaded_keys(loading_info, pretrained_model_name_or_path)
        for module in model.modules():
            if hasattr(module, "mark_expert_parameters"):  # loading replaced the marked expert parameters
                module.mark_expert_parameters()
        return (model, loading_info) if output_loading_info else model

    def _save_expert_parallel(self, save_directory, is_main_process, *args, state_dict=None, **kwargs):
        from .expert_parallel import consolidated_state_dict

        collective = state_dict is None
        if collective:
            state_dict = consolidated_state_dict(self)
        for name, module in self.named_modules():
            if isinstance(module, SwitchExperts) and state_dict[f"{name}.wo"].shape[0] != self.config.num_experts:
                raise ValueError(
                    f"save_pretrained: state_dict holds {state_dict[f'{name}.wo'].shape[0]} experts for {name}, one "
                    f"rank's share of {self.config.num_experts}; pass hf_switch.expert_parallel."
                    "consolidated_state_dict(model) (called on every rank), or no state_dict."
                )
        result = None
        if self.should_save_on_this_rank(is_main_process):
            self.config.expert_parallel_size, expert_parallel_size = 1, self.config.expert_parallel_size
            try:
                result = self.save_pretrained(save_directory, is_main_process, *args, state_dict=state_dict, **kwargs)
            finally:
                self.config.expert_parallel_size = expert_parallel_size
        if collective:
            torch.distributed.barrier()
        return result

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        # The seam where transformers has resolved the weight files (local, cached from the Hub, or shards) and not
        # yet opened them: a truncated file would otherwise fail in safetensors without naming itself.
        model_dtypes = {key: tensor.dtype for key, tensor in model.state_dict().items()}
        for file in checkpoint_files or ():
            if file.endswith(".safetensors"):
                check_stored_dtypes(file, read_safetensors_header(file), model_dtypes)
        if model.config.expert_parallel_size > 1 and state_dict is None:
            from .expert_parallel import local_expert_state_dict

            state_dict = local_expert_state_dict(model, checkpoint_files)
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs)

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers skips, for custom code, modules that own no parameters themselves (T5Attention, the router)
        # in case their init writes in place. Ours uses `transformers.initialization`, which leaves loaded tensors
        # alone, so every module can be initialised.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module):
        """T5's initialisation; router weights as in the paper (normal, std sqrt(0.1 / fan_in))."""
        super()._init_weights(module)
        factor = self.config.initializer_factor
        d_model, d_ff = self.config.d_model, self.config.d_ff
        if isinstance(module, T5LayerNorm):
            init.constant_(module.weight, factor * 1.0)
        elif isinstance(module, (SwitchEncoderDecoderModel, SwitchEncoderModel)):
            init.normal_(module.shared.weight, mean=0.0, std=factor * 1.0)
            if hasattr(module, "lm_head") and not self.config.tie_word_embeddings:
                init.normal_(module.lm_head.weight, mean=0.0, std=factor * 1.0)
        elif isinstance(module, (T5DenseActDense, T5DenseGatedActDense)):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name).weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.wo.weight, mean=0.0, std=factor * d_ff**-0.5)
        elif isinstance(module, SwitchExperts):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name), mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.wo, mean=0.0, std=factor * d_ff**-0.5)
        elif isinstance(module, SwitchRouter):
            init.normal_(module.classifier.weight, mean=0.0, std=factor * (0.1 / d_model) ** 0.5)
            if module.classifier.bias is not None:
                init.zeros_(module.classifier.bias)
            init.zeros_(module.step_expert_counts)
            if module.uses_expert_bias:
                init.zeros_(module.expert_bias)
        elif isinstance(module, T5Attention):
            key_value_proj_dim, n_heads = self.config.d_kv, self.config.num_heads
            init.normal_(module.q.weight, mean=0.0, std=factor * ((d_model * key_value_proj_dim) ** -0.5))
            init.normal_(module.k.weight, mean=0.0, std=factor * (d_model**-0.5))
            init.normal_(module.v.weight, mean=0.0, std=factor * (d_model**-0.5))
            init.normal_(module.o.weight, mean=0.0, std=factor * ((n_heads * key_value_proj_dim) ** -0.5))
            if module.has_relative_attention_bias:
                init.normal_(module.relative_attention_bias.weight, mean=0.0, std=factor * (d_model**-0.5))

    def _shift_right(self, input_ids):
        """Decoder inputs from labels: prepend `decoder_start_token_id`, replace -100 by `pad_token_id`."""
        decoder_start_token_id = self.config.decoder_start_token_id
        pad_token_id = self.config.pad_token_id
        if decoder_start_token_id is None or pad_token_id is None:
            raise ValueError(
                "SwitchConfig.decoder_start_token_id and pad_token_id must be set to shift labels into decoder inputs "
                f"(got {decoder_start_token_id!r} and {pad_token_id!r}); T5 uses the pad token id for both."
            )
        shifted = input_ids.new_zeros(input_ids.shape)
        shifted[..., 1:] = input_ids[..., :-1].clone()
        shifted[..., 0] = decoder_start_token_id
        return shifted.masked_fill_(shifted == -100, pad_token_id)


class SwitchStack(SwitchPreTrainedModel):
    """The encoder or the decoder: embeddings, blocks, final norm; collects the sparse layers' routing."""

    def __init__(self, config: SwitchConfig, sparse_layers: list[int]):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.is_decoder = config.is_decoder
        self.block = nn.ModuleList(
            [
                SwitchBlock(config, has_relative_attention_bias=i == 0, is_sparse=i in sparse_layers, layer_idx=i)
                for i in range(config.num_layers)
            ]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.post_init()

    @property
    def sparse_layers(self) -> list[int]:
        """Indices of the blocks whose feed-forward is a mixture of experts."""
        return [i for i, block in enumerate(self.block) if block.is_sparse]

    def set_input_embeddings(self, new_embeddings):
        self.embed_tokens = new_embeddings

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        inputs_embeds=None,
        cache=None,
        use_cache=None,
        output_router_logits=False,
        output_routing_stats=True,
        output_attentions=None,
        output_hidden_states=None,
    ) -> SwitchStackOutput:
        """`output_routing_stats=False` skips the router losses and loads (`routing` is then None): `generate()`
        passes it, since nothing reads them while decoding and they cost about 5 % of a decoding step.
        `output_attentions` and `output_hidden_states` are read by transformers' output capturing around this method.

        No catch-all keywords: `generate()` hands the encoder every keyword a signature with one would take (the
        `labels` of `Seq2SeqTrainer`'s evaluation among them), and a keyword this stack does not use is an error.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        attention = self.config._attn_implementation
        if (output_attentions or self.config.output_attentions) and attention != "eager":
            # transformers would only log this and return empty tuples.
            raise ValueError(
                f"output_attentions=True: attn_implementation={attention!r} computes no attention weights. Load the "
                "model with attn_implementation='eager', or call model.set_attn_implementation('eager') first."
            )
        prefix = "decoder_" if self.is_decoder else ""
        if inputs_embeds is None:
            # The embedding's own size: `resize_token_embeddings` replaces it without touching this stack's config.
            _check_token_ids(input_ids, self.embed_tokens.num_embeddings, f"{prefix}input_ids")
            inputs_embeds = self.embed_tokens(input_ids)
        _check_not_empty(inputs_embeds, f"{prefix}input_ids" if input_ids is not None else f"{prefix}inputs_embeds")

        if not self.is_decoder:
            cache = None
        elif use_cache and cache is None:
            cache = SwitchCache(config=self.config)
        elif isinstance(cache, EncoderDecoderCache):
            cache = SwitchCache.wrap(cache)

        token_mask = _routing_mask(attention_mask, inputs_embeds, self.config.router_ignore_padding_tokens)
        if self.is_decoder:
            attention_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache.self_attention_cache if cache is not None else None,
            )
        else:
            attention_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
            )
        encoder_extended_attention_mask = None
        if self.is_decoder and encoder_hidden_states is not None:
            encoder_extended_attention_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
            )

        hidden_states = self.dropout(inputs_embeds)
        position_bias = encoder_decoder_position_bias = None
        decisions: list[RouterDecision] = []
        for block in self.block:
            hidden_states, position_bias, encoder_decoder_position_bias, decision, router_logits = block(
                hidden_states,
                attention_mask,
                position_bias,
                encoder_hidden_states,
                encoder_extended_attention_mask,
                encoder_decoder_position_bias,
                token_mask,
                cache=cache,
            )
            if decision is not None:
                decisions.append(decision.rejoined(router_logits))
        if self.config.router_check_finite:
            _check_router_logits_finite(decisions, self.sparse_layers, "decoder" if self.is_decoder else "encoder")

        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
        global_balancing = self.config.load_balancing_scope == "global_batch"
        fractions = [None] * len(decisions)
        if self.training and decisions and (global_balancing or self.config.router_expert_bias):
            step_fractions = self._count_step_loads(decisions)
            if global_balancing:
                fractions = step_fractions
        routing = tuple(map(routing_stats, decisions, fractions)) if output_routing_stats else None
        return SwitchStackOutput(last_hidden_state=hidden_states, cache=cache, routing=routing)

    def _count_step_loads(self, decisions: list[RouterDecision]) -> list[torch.Tensor]:
        """Per sparse layer, `[E]` share of the routed choices of the optimizer step so far, over all processes.

        This forward's counts are summed over the data-parallel processes (one all-reduce for the stack) and added
        to each router's `step_expert_counts`, which `routing.end_balancing_step` turns into an expert-bias step
        and clears after the optimizer step.
        """
        counts = torch.stack([chosen_expert_counts(decision) for decision in decisions])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        routers = [block.layer[-1].mlp.router for block in self.block if block.is_sparse]
        fractions = []
        for router, layer_counts in zip(routers, counts, strict=True):
            router.step_expert_counts += layer_counts
            fractions.append(router.step_expert_counts / router.step_expert_counts.sum().clamp(min=1))
        return fractions


# Keywords a forward takes beyond its named arguments: transformers' output flags (read by the output capturing) and
# the routing statistics switch. Anything else would be silently ignored, so it is refused.
ACCEPTED_KEYWORDS = ("output_attentions", "output_hidden_states", "output_routing_stats")


def _refuse_unknown_keywords(kwargs: dict, owner: str) -> None:
    unknown = sorted(set(kwargs) - set(ACCEPTED_KEYWORDS))
    if unknown:
        raise TypeError(
            f"{owner}.forward() got keyword arguments it does not use: {', '.join(unknown)}. Besides its named "
            f"arguments it takes {', '.join(ACCEPTED_KEYWORDS)} (and return_dict)."
        )


def _stack_embeddings(embeddings: nn.Embedding, config: SwitchConfig) -> nn.Embedding:
    """A stack's token embeddings when the model's are set to `embeddings` (e.g. by `resize_token_embeddings`):
    the same module when the config ties embeddings, else a copy of its own, since without `tie_word_embeddings`
    transformers ties nothing and each stack's embeddings are saved and loaded as separate weights."""
    return embeddings if config.tie_word_embeddings else copy.deepcopy(embeddings)


def _is_traced() -> bool:
    """Whether torch.compile or torch.export is tracing: a traced graph cannot branch on tensor values, so checks
    become runtime assertions of the graph (`torch._check`)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _check_token_ids(token_ids: torch.Tensor, vocab_size: int, name: str, ignore_index: int | None = None) -> None:
    """Name the first id outside `[0, vocab_size)` other than `ignore_index`, which an embedding or the loss would
    otherwise fail on with an index error from deep inside."""
    outside = (token_ids < 0) | (token_ids >= vocab_size)
    if ignore_index is not None:
        outside &= token_ids != ignore_index
    if _is_traced():
        torch._check((~outside).all().item(), lambda: f"{name}: a token id is outside [0, vocab_size={vocab_size}).")
    elif outside.any():
        also = "" if ignore_index is None else f" (or {ignore_index})"
        bad = token_ids[outside][0].item()
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, vocab_size={vocab_size}){also}.")


def _check_not_empty(inputs_embeds: torch.Tensor, name: str) -> None:
    if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
        raise ValueError(
            f"{name}: got shape {tuple(inputs_embeds.shape[:2])}; the batch size and the sequence length must be at "
            "least 1."
        )


def _check_router_logits_finite(decisions: list[RouterDecision], sparse_layers: list[int], stack: str) -> None:
    """Raise when a sparse layer's router logits hold NaN or inf, naming the first such layer.

    One host-device synchronisation for the whole stack; the layer is located only once something is wrong.
    """
    if not decisions:
        return
    finite = torch.stack([decision.logits.isfinite().all() for decision in decisions])
    if _is_traced():
        torch._check(finite.all().item(), lambda: f"The router logits of the {stack} hold NaN or inf values.")
        return
    if finite.all():
        return
    position = int((~finite).nonzero()[0])
    logits = decisions[position].logits
    raise FloatingPointError(
        f"The router logits of {stack} layer {sparse_layers[position]} hold {int(logits.isnan().sum())} NaN and "
        f"{int(logits.isinf().sum())} inf values out of {logits.numel()}: the hidden states reaching that router are "
        "not finite (a diverging run, a learning rate too high, an overflow in float16, or non-finite inputs_embeds). "
        "SwitchConfig.router_check_finite=False turns this check off."
    )


def _routing_mask(attention_mask, inputs_embeds, ignore_padding: bool) -> torch.Tensor:
    """`[B, T]` tokens that take part in routing: all, or the unpadded ones when padding is ignored."""
    batch, length = inputs_embeds.shape[:2]
    if not ignore_padding or attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=inputs_embeds.device)
    # During cached decoding the mask covers past and new positions; the new ones are last.
    return attention_mask[:, -length:].to(device=inputs_embeds.device, dtype=torch.bool)


def _summarize_routing(prefix: str, stack_output: SwitchStackOutput, output_router_logits: bool) -> dict:
    """`SwitchSeq2SeqOutput` fields of one stack: summed router losses and stacked per-layer loads."""
    stats = stack_output.routing
    if stats is None:  # not computed (`output_routing_stats=False`), or encoder outputs passed in from outside
        return {}
    if not stats:
        zero = stack_output.last_hidden_state.new_zeros((), dtype=torch.float32)
        return {f"{prefix}_aux_loss": zero, f"{prefix}_z_loss": zero}
    return {
        f"{prefix}_aux_loss": torch.stack([layer.aux_loss for layer in stats]).sum(),
        f"{prefix}_z_loss": torch.stack([layer.z_loss for layer in stats]).sum(),
        f"{prefix}_router_logits": tuple(layer.router_logits for layer in stats) if output_router_logits else None,
        f"{prefix}_expert_counts": torch.stack([layer.expert_counts for layer in stats]),
        f"{prefix}_dropped_fraction": torch.stack([layer.dropped_fraction for layer in stats]),
    }


class SwitchEncoderDecoderModel(SwitchPreTrainedModel):
    """Shared embeddings, encoder and decoder; the base of [`SwitchModel`] and [`SwitchForConditionalGeneration`]."""

    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: SwitchConfig):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)

        encoder_config = copy.deepcopy(config)
        encoder_config.is_decoder = False
        encoder_config.use_cache = False
        self.encoder = SwitchStack(encoder_config, config.sparse_encoder_layers)

        decoder_config = copy.deepcopy(config)
        decoder_config.is_decoder = True
        decoder_config.num_layers = config.num_decoder_layers
        self.decoder = SwitchStack(decoder_config, config.sparse_decoder_layers)

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, new_embeddings):
        self.shared = new_embeddings
        self.encoder.set_input_embeddings(_stack_embeddings(new_embeddings, self.config))
        self.decoder.set_input_embeddings(_stack_embeddings(new_embeddings, self.config))

    def get_encoder(self):
        return self.encoder

    def _encode_decode(
        self,
        input_ids,
        attention_mask,
        decoder_input_ids,
        decoder_attention_mask,
        encoder_outputs,
        cache,
        inputs_embeds,
        decoder_inputs_embeds,
        use_cache,
        output_router_logits,
        **kwargs,
    ) -> tuple[SwitchStackOutput, SwitchStackOutput]:
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_router_logits=output_router_logits,
                return_dict=True,  # the stack's output object, whatever `config.return_dict` asks of the model
                **kwargs,
            )
        elif not isinstance(encoder_outputs, SwitchStackOutput):
            encoder_outputs = SwitchStackOutput(last_hidden_state=encoder_outputs[0])
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            return_dict=True,
            **kwargs,
        )
        return encoder_outputs, decoder_outputs

    @staticmethod
    def _seq2seq_output(encoder_outputs, decoder_outputs, output_router_logits, **fields) -> SwitchSeq2SeqOutput:
        return SwitchSeq2SeqOutput(
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            **_summarize_routing("encoder", encoder_outputs, output_router_logits),
            **_summarize_routing("decoder", decoder_outputs, output_router_logits),
            **fields,
        )


class SwitchModel(SwitchEncoderDecoderModel):
    """The bare encoder-decoder, returning the decoder's last hidden state."""

    def __init__(self, config: SwitchConfig):
        super().__init__(config)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
        cache=None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        use_cache=None,
        output_router_logits=False,
        **kwargs,
    ) -> SwitchSeq2SeqOutput:
        _refuse_unknown_keywords(kwargs, type(self).__name__)
        encoder_outputs, decoder_outputs = self._encode_decode(
            input_ids,
            attention_mask,
            decoder_input_ids,
            decoder_attention_mask,
            encoder_outputs,
            cache,
            inputs_embeds,
            decoder_inputs_embeds,
            use_cache,
            output_router_logits,
            **kwargs,
        )
        return self._seq2seq_output(
            encoder_outputs,
            decoder_outputs,
            output_router_logits,
            last_hidden_state=decoder_outputs.last_hidden_state,
        )


class SwitchForConditionalGeneration(SwitchEncoderDecoderModel, GenerationMixin):
    """Switch Transformer with a language-modelling head, for training and `generate()`.

    The loss is the token cross-entropy plus the router losses of every sparse layer. When the Trainer passes
    `num_items_in_batch`, the cross-entropy is summed and divided by it and the router losses are weighted by this
    batch's share of those items, so gradient accumulation and several processes give the loss of one big batch.
    """

    _tied_weights_keys = {
        **SwitchEncoderDecoderModel._tied_weights_keys,
        "lm_head.weight": "shared.weight",
    }

    def __init__(self, config: SwitchConfig):
        super().__init__(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
        cache=None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_router_logits=False,
        num_items_in_batch=None,
        **kwargs,
    ) -> SwitchSeq2SeqOutput:
        r"""
        input_ids: `[B, T]` encoder token ids.
        decoder_input_ids: `[B, T_dec]`; built from `labels` by shifting right when absent.
        labels: `[B, T_dec]` target ids, -100 where ignored.
        output_router_logits: also return each sparse layer's `[B, T, E]` router logits.
        num_items_in_batch: number of target tokens in the whole (accumulated, all-process) batch.
        output_routing_stats (keyword, default True): False skips the router losses and expert loads of both stacks
            (their output fields are then None), as `generate()` does; not with `labels`, whose loss needs them.
        """
        _refuse_unknown_keywords(kwargs, type(self).__name__)
        if labels is not None and kwargs.get("output_routing_stats") is False:
            raise ValueError(
                "output_routing_stats=False with labels: the loss adds the router losses, which need the routing "
                "statistics. Leave output_routing_stats at True when passing labels."
            )
        if labels is not None:
            _check_token_ids(labels, self.lm_head.out_features, "labels", ignore_index=-100)
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        if labels is not None and decoder_attention_mask is None and self.config.router_ignore_padding_tokens:
            # The targets' trailing padding is known only from the labels; it comes after every real position, so
            # masking it changes nothing the loss sees, and keeps it out of routing and its statistics.
            decoder_attention_mask = (labels != -100).long()
        encoder_outputs, decoder_outputs = self._encode_decode(
            input_ids,
            attention_mask,
            decoder_input_ids,
            decoder_attention_mask,
            encoder_outputs,
            cache,
            inputs_embeds,
            decoder_inputs_embeds,
            use_cache,
            output_router_logits,
            **kwargs,
        )
        sequence_output = decoder_outputs.last_hidden_state
        if self.config.tie_word_embeddings:
            # Mesh TensorFlow rescales before the tied projection onto the vocabulary.
            sequence_output = sequence_output * (self.config.d_model**-0.5)
        logits = self.lm_head(sequence_output)

        loss = router_loss = None
        if labels is not None:
            loss, router_loss = self._loss(logits, labels, encoder_outputs, decoder_outputs, num_items_in_batch)
        return self._seq2seq_output(
            encoder_outputs, decoder_outputs, output_router_logits, loss=loss, logits=logits, router_loss=router_loss
        )

    def _loss(self, logits, labels, encoder_outputs, decoder_outputs, num_items_in_batch):
        """`(loss, router_loss)`: the loss, and the weighted router losses it includes."""
        labels = labels.to(logits.device)
        router_loss = logits.new_zeros((), dtype=torch.float32)
        for stack_output in (encoder_outputs, decoder_outputs):
            for layer in stack_output.routing or ():
                router_loss = router_loss + self.config.router_aux_loss_coef * layer.aux_loss
                router_loss = router_loss + self.config.router_z_loss_coef * layer.z_loss
        flat_logits = logits.reshape(-1, logits.shape[-1]).float()
        if num_items_in_batch is None:
            cross_entropy = nn.functional.cross_entropy(flat_logits, labels.reshape(-1), ignore_index=-100)
            return cross_entropy + router_loss, router_loss
        token_loss = nn.functional.cross_entropy(flat_logits, labels.reshape(-1), ignore_index=-100, reduction="sum")
        num_items_in_batch = torch.as_tensor(num_items_in_batch, device=logits.device)
        share = (labels != -100).sum() / num_items_in_batch
        return token_loss / num_items_in_batch + router_loss * share, router_loss * share

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Decode with a `SwitchCache` sized for the decoder's layers.

        transformers sizes its default cache from `num_hidden_layers`, the encoder's depth, which breaks when
        `num_decoder_layers` differs; and a plain cache would forget which experts earlier positions chose.
        """
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if type(cache) is EncoderDecoderCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs["cache"] = SwitchCache(config=self.decoder.config)

    def generate(self, *args, synced_gpus=None, output_routing_stats=False, **kwargs):
        """`GenerationMixin.generate`, without routing statistics unless asked for (nothing reads them while
        decoding). Under expert parallelism the ranks decode in lockstep (`synced_gpus`), since every step's
        all-to-all needs the whole group, also ranks whose sequences have finished."""
        if self.config.expert_parallel_size > 1:
            synced_gpus = True
        return super().generate(*args, synced_gpus=synced_gpus, output_routing_stats=output_routing_stats, **kwargs)

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)
        config = self.config
        capacity_field = "expert_capacity" if config.expert_capacity is not None else "eval_capacity_factor"
        capacity = getattr(config, capacity_field)
        if (
            generation_mode in (GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE)
            and config.routing_group != "sequence"
            and config.num_sparse_decoder_layers > 0
            and capacity is not None
        ):
            raise ValueError(
                f"Beam search with SwitchConfig.routing_group={config.routing_group!r} and a decoder capacity "
                f"({capacity_field}={capacity!r}): "
                "beams are reordered between steps, which changes the groups earlier positions were routed in, so "
                "cached decoding could not equal a forward over the final beams. Set eval_capacity_factor=None "
                "(dropless evaluation), or routing_group='sequence'."
            )

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor):
        return self._shift_right(labels)


class SwitchEncoderModel(SwitchPreTrainedModel):
    """The encoder alone, for embeddings and classification heads."""

    _tied_weights_keys = {"encoder.embed_tokens.weight": "shared.weight"}
    # A full encoder-decoder checkpoint loads into the encoder alone, as with T5EncoderModel.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: SwitchConfig):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        encoder_config = copy.deepcopy(config)
        encoder_config.use_cache = False
        encoder_config.is_encoder_decoder = False
        self.encoder = SwitchStack(encoder_config, config.sparse_encoder_layers)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, new_embeddings):
        self.shared = new_embeddings
        self.encoder.set_input_embeddings(_stack_embeddings(new_embeddings, self.config))

    @can_return_tuple
    def forward(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, output_router_logits=False, **kwargs
    ) -> SwitchEncoderOutput:
        _refuse_unknown_keywords(kwargs, type(self).__name__)
        outputs = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_router_logits=output_router_logits,
            return_dict=True,
            **kwargs,
        )
        routing = _summarize_routing("encoder", outputs, output_router_logits)
        return SwitchEncoderOutput(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{name.removeprefix("encoder_"): value for name, value in routing.items()},
        )


__all__ = [
    "SwitchCache",
    "SwitchEncoderModel",
    "SwitchForConditionalGeneration",
    "SwitchModel",
    "SwitchPreTrainedModel",
    "SwitchEncoderOutput",
    "SwitchStackOutput",
    "SwitchSeq2SeqOutput",
]
