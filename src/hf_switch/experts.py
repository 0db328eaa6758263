"""Experts as stacked weights, and the permutation that hands each expert its tokens.

Shapes: `N` tokens, `k` experts per token, `M` kept (token, expert) pairs, `E` experts, `d` = d_model,
`f` = d_ff. Expert weights are stacked `[E, out_features, in_features]`, the layout of `nn.Linear` weights and of
transformers' fused MoE experts.
"""

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .configuration_switch import SwitchConfig
from .expert_kernels import GradientMemory, GroupedLinear, PaddedLinear

# transformers' registered expert kernels (`from_pretrained(..., experts_implementation=...)`) that run Switch experts
# exactly: they take every (token, expert) pair with its weight, so a pair dropped by capacity runs with weight 0 and
# adds nothing (its compute is spent, not saved). "eager" is hf_switch's own kernels, the default.
TRANSFORMERS_EXPERTS = ("batched_mm", "grouped_mm")
LAYOUTS = ("auto", "grouped", "fused_grouped", "padded")


def check_experts_implementation(requested: str | None, config: SwitchConfig) -> str:
    """The experts implementation a Switch model runs for `requested` (None: hf_switch's own, "eager")."""
    if requested in (None, "eager"):
        return "eager"
    allowed = "'eager' (hf_switch's grouped and padded kernels, the default) or one of transformers' " + " and ".join(
        repr(name) for name in TRANSFORMERS_EXPERTS
    )
    if requested not in TRANSFORMERS_EXPERTS:
        why = (
            "a CUDA kernel of transformers not verified with Switch experts"
            if requested in ALL_EXPERTS_FUNCTIONS
            else "not an experts implementation a Switch model can run"
        )
        raise ValueError(f"experts_implementation={requested!r} is {why}; choose {allowed}.")
    if config.expert_parallel_size > 1:
        raise ValueError(
            f"experts_implementation={requested!r} runs every expert in this process, but expert_parallel_size="
            f"{config.expert_parallel_size} spreads them over ranks: use 'eager' (hf_switch's all-to-all dispatch)."
        )
    return requested


@dataclass
class Dispatch:
    """Kept (token, expert) pairs grouped by expert.

    Attributes:
        token_ids: `[M]` source token of each pair, ordered by expert (stable in token order).
        weights: `[M]` combine weight of each pair, or None where every pair weighs 1.
        tokens_per_expert: `[E]` number of pairs per expert.
    """

    token_ids: torch.Tensor
    weights: torch.Tensor | None
    tokens_per_expert: torch.Tensor


def group_by_expert(expert_index, expert_weight, kept, num_experts: int) -> Dispatch:
    """Order the kept (token, expert) pairs by expert with one stable sort.

    Args:
        expert_index: `[N, k]` chosen experts.
        expert_weight: `[N, k]` their combine weights.
        kept: `[N, k]` which pairs are within capacity.
    """
    token_ids = torch.arange(expert_index.shape[0], device=expert_index.device)[:, None].expand_as(expert_index)
    experts = expert_index[kept]
    order = torch.argsort(experts, stable=True)
    return Dispatch(
        token_ids=token_ids[kept][order],
        weights=expert_weight[kept][order],
        tokens_per_expert=torch.bincount(experts, minlength=num_experts),
    )


def combine(
    expert_outputs: torch.Tensor, token_ids: torch.Tensor, weights: torch.Tensor | None, num_tokens: int
) -> torch.Tensor:
    """Weight each pair's expert output and sum it back onto its token; tokens no pair names get zeros.

    Args:
        expert_outputs: `[P, d]` one row per pair.
        token_ids: `[P]` the token of each pair.
        weights: `[P]` the weight of each pair, or None for 1.

    Returns:
        `[N, d]`.
    """
    if weights is not None:
        expert_outputs = expert_outputs * weights[:, None].to(expert_outputs.dtype)
    combined = expert_outputs.new_zeros(num_tokens, expert_outputs.shape[-1])
    return combined.index_add_(0, token_ids, expert_outputs)


class SwitchExperts(nn.Module):
    """`E` feed-forward networks held as stacked weights.

    Parameters: `wi` `[E, f, d]` (or `wi_0` and `wi_1` for a gated activation) and `wo` `[E, d, f]`. They are
    read as attributes of this module inside its own `forward`, which expert sharding relies on; expert LoRA
    (`expert_lora`) adds its low-rank products inside `forward`.

    The experts run in one of three layouts (see `expert_kernels`), chosen per call by `layout`: "grouped" (one
    matrix product per expert on its contiguous rows), "fused_grouped" (the same rows in one `torch._grouped_mm`
    call: the fused grouped GEMM of CUDA devices, which needs no host copy of the group sizes), "padded" (one batched
    product over rows padded to the largest group), or "auto". "auto" takes "fused_grouped" where that kernel is fast
    (CUDA, bf16, compute capability 9.0 and up: H100-class); otherwise it pads when nearly every expert has tokens (a
    batched product reads every expert's weights, even an empty one's, which rules it out when decoding a few
    tokens) and padding adds less work than the batched product saves over per-expert products: much for small
    groups, where per-expert products leave the cores idle, little for large ones. Measured on CPU in fp32 (d_model
    512, d_ff 2048, forward and backward), the padded layout breaks even at about 2.1 padded rows per real row with
    16 rows per expert, 1.4 with 64 and 1.15 with 256: `1 + 8 / mean_rows ** 0.75`. Unbalanced routing (common early
    in training) pads far beyond that.
    """

    # Fraction of experts that may be empty for the padded layout.
    empty_budget = 0.125

    def __init__(self, config: SwitchConfig, num_local_experts: int | None = None):
        super().__init__()
        self.num_experts = config.num_experts
        # All of them, unless expert parallelism spreads them over ranks (see `expert_parallel`).
        self.num_local_experts = config.num_experts if num_local_experts is None else num_local_experts
        self.is_gated = config.is_gated_act
        shape_in = (self.num_local_experts, config.d_ff, config.d_model)
        if self.is_gated:
            self.wi_0 = nn.Parameter(torch.empty(shape_in))
            self.wi_1 = nn.Parameter(torch.empty(shape_in))
        else:
            self.wi = nn.Parameter(torch.empty(shape_in))
        self.wo = nn.Parameter(torch.empty(self.num_local_experts, config.d_model, config.d_ff))
        # ReLU in place: the expert products keep their inputs, not their outputs, for the backward pass, so it may
        # overwrite them (one pass over `[rows, d_ff]` less: 4-5 % of the layer's forward at E = 8 and 32).
        self.act = nn.ReLU(inplace=True) if config.dense_act_fn == "relu" else ACT2FN[config.dense_act_fn]
        self.dropout = nn.Dropout(config.experts_dropout_rate)
        self.layout = "auto"
        self.gradient_memory = {name: GradientMemory() for name, _ in self.named_parameters(recurse=False)}

    def forward(self, hidden_states: torch.Tensor, dispatch: Dispatch, low_rank_update=None) -> torch.Tensor:
        """Run every dispatched (token, expert) pair and sum the weighted outputs back onto the tokens.

        The tokens are gathered once, straight into the chosen layout, and the outputs scattered once, straight from
        it.

        Args:
            hidden_states: `[N, d]` tokens.
            dispatch: the pairs, grouped by held expert (`tokens_per_expert` has `num_local_experts` entries).
            low_rank_update: None, or `low_rank_update(rows, name, product)` -> what to add to the product of `rows`
                with the weight `name` (expert LoRA, `expert_lora`); `product(rows, stacked, gradient_memory)`
                multiplies the rows by any `[E, out, in]` stack in the layout this call chose.

        Returns:
            `[N, d]`; zeros for tokens that no pair names.
        """
        weights = {"wi_0": self.wi_0, "wi_1": self.wi_1} if self.is_gated else {"wi": self.wi}
        weights["wo"] = self.wo
        device_type = hidden_states.device.type
        if torch.is_autocast_enabled(device_type):
            # Autocast does not reach into the expert kernels (their products write into outputs they allocate), so
            # the layer casts as autocast would: products in its dtype; the casts carry the weights' gradients back
            # to the weights' own dtype.
            compute_dtype = torch.get_autocast_dtype(device_type)
            weights = {name: weight.to(compute_dtype) for name, weight in weights.items()}
            hidden_states = hidden_states.to(compute_dtype)
        token_ids, pair_weights = dispatch.token_ids, dispatch.weights
        layout, group_sizes = self._layout(dispatch.tokens_per_expert, hidden_states)
        if layout == "fused_grouped":
            tokens = hidden_states.index_select(0, token_ids)
            offsets = dispatch.tokens_per_expert.cumsum(0, dtype=torch.int32)
            product = lambda rows, stacked, memory: torch._grouped_mm(rows, stacked.mT, offs=offsets)  # noqa: E731
        elif layout == "padded":
            experts, capacity, width = self.num_local_experts, max(group_sizes), hidden_states.shape[-1]
            pairs, padding = padded_layout(dispatch.tokens_per_expert, capacity)
            token_ids = token_ids[pairs]
            pair_weights = None if pair_weights is None else pair_weights[pairs]
            # Padding rows gather the first pair's token and are zeroed: with bias-free experts their outputs are
            # exactly zero, so they add nothing to that token, nor to any gradient.
            tokens = hidden_states.index_select(0, token_ids).index_fill_(0, padding, 0).view(experts, capacity, width)
            product = PaddedLinear.apply
        else:
            tokens = hidden_states.index_select(0, token_ids)
            product = lambda rows, stacked, memory: GroupedLinear.apply(rows, stacked, group_sizes, memory)  # noqa: E731

        def linear(rows, name):
            output = product(rows, weights[name], self.gradient_memory[name])
            return output if low_rank_update is None else output + low_rank_update(rows, name, product)

        outputs = self._ffn(tokens, linear, weights["wo"].dtype)
        return combine(outputs.view(-1, outputs.shape[-1]), token_ids, pair_weights, hidden_states.shape[0])

    def forward_pairs(self, implementation: str, hidden_states, expert_index, expert_weight, kept) -> torch.Tensor:
        """The experts through transformers' kernel `implementation` (one of `TRANSFORMERS_EXPERTS`), which takes
        every (token, expert) pair: `[N, d]` tokens, `[N, k]` experts, weights and kept pairs -> `[N, d]`.

        The kernel reads this module through transformers' experts attributes: `up_proj` is `wi`, `gate_up_proj`
        stacks `wi_0` over `wi_1` (a copy per call), `down_proj` is `wo`; the activation carries the expert dropout.
        """
        activate = lambda inner: self.dropout(self.act(inner))  # noqa: E731

        def apply_gate(gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return self.dropout(self.act(gate) * up)

        experts = SimpleNamespace(
            num_experts=self.num_local_experts,
            has_gate=self.is_gated,
            has_bias=False,
            has_post_expert_norm=False,
            is_transposed=False,
            _is_expert_parallel=False,
            act_fn=activate,
            _apply_gate=apply_gate,
            down_proj=self.wo,
        )
        if self.is_gated:
            experts.gate_up_proj = torch.cat([self.wi_0, self.wi_1], dim=1)
        else:
            experts.up_proj = self.wi
        weights = expert_weight.masked_fill(~kept, 0)
        return ALL_EXPERTS_FUNCTIONS[implementation](experts, hidden_states, expert_index, weights)

    def _layout(self, tokens_per_expert: torch.Tensor, hidden_states: torch.Tensor) -> tuple[str, list[int] | None]:
        """This call's layout, and the group sizes as a list (one host copy; None for "fused_grouped", which reads
        them on the device)."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"SwitchExperts.layout={self.layout!r}: choose one of {LAYOUTS}.")
        auto_fused = self.layout == "auto" and fused_grouped_gemm_available(hidden_states)
        if self.layout == "fused_grouped" or auto_fused:
            return "fused_grouped", None
        group_sizes = tokens_per_expert.tolist()
        if self.layout != "auto":
            return self.layout, group_sizes
        experts = self.num_local_experts
        rows, empty = sum(group_sizes), group_sizes.count(0)
        if rows == 0 or empty > self.empty_budget * experts:
            return "grouped", group_sizes
        padded_rows = experts * max(group_sizes)
        padded = padded_rows <= rows * (1 + 8 / (rows / experts) ** 0.75)
        return ("padded" if padded else "grouped"), group_sizes

    def _ffn(self, tokens, linear, output_dtype):
        """The expert feed-forward network, with `linear(x, weight_name)` applying each expert's weight."""
        if self.is_gated:
            inner = self.act(linear(tokens, "wi_0")) * linear(tokens, "wi_1")
        else:
            inner = self.act(linear(tokens, "wi"))
        inner = self.dropout(inner)
        return linear(inner.to(output_dtype), "wo")

    def train(self, mode: bool = True):
        if not mode:  # no backward passes ahead: give the gradients' memory back
            for memory in self.gradient_memory.values():
                memory.release()
        return super().train(mode)


def fused_grouped_gemm_available(hidden_states: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs as one fused kernel for these tokens: CUDA, bf16, compute capability 9.0+.

    Elsewhere it runs (CPU included, where the tests check it against the other layouts) but is no faster than a
    loop of products: 1.15x-1.7x the "grouped" layout's forward and backward on CPU at E = 8-128 (fp32, torch 2.13).
    """
    return (
        hidden_states.is_cuda
        and hidden_states.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(hidden_states.device) >= (9, 0)
    )


def padded_layout(tokens_per_expert: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `e`'s `j`-th pair goes to row `e * capacity + j` of the `[E * capacity]` padded layout.

    Returns:
        `[E * capacity]` the pair (index in grouped order) in each row, 0 in padding rows; and the padding rows.
    """
    num_experts = tokens_per_expert.shape[0]
    within = torch.arange(capacity, device=tokens_per_expert.device).repeat(num_experts)  # j of each row
    expert_starts = tokens_per_expert.cumsum(0) - tokens_per_expert
    pairs = expert_starts.repeat_interleave(capacity) + within
    is_padding = within >= tokens_per_expert.repeat_interleave(capacity)
    return pairs.masked_fill_(is_padding, 0), is_padding.nonzero().squeeze(1)
