"""Experts as stacked weights, and the permutation that hands each expert its tokens.

Shapes: `N` tokens, `k` experts per token, `M` kept (token, expert) pairs, `E` experts, `d` = d_model,
`f` = d_ff. Expert weights are stacked `[E, out_features, in_features]`, the layout of `nn.Linear` weights and of
transformers' fused MoE experts.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration_switch import SwitchConfig


@dataclass
class Dispatch:
    """Kept (token, expert) pairs grouped by expert.

    Attributes:
        token_ids: `[M]` source token of each pair, ordered by expert (stable in token order).
        weights: `[M]` combine weight of each pair.
        tokens_per_expert: `[E]` number of pairs per expert.
    """

    token_ids: torch.Tensor
    weights: torch.Tensor
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


def combine(expert_outputs: torch.Tensor, dispatch: Dispatch, num_tokens: int) -> torch.Tensor:
    """Weight each pair's expert output and sum it back onto its token; dropped tokens get zeros.

    Args:
        expert_outputs: `[M, d]` in dispatch order.

    Returns:
        `[N, d]`.
    """
    weighted = expert_outputs * dispatch.weights[:, None].to(expert_outputs.dtype)
    combined = expert_outputs.new_zeros(num_tokens, expert_outputs.shape[-1])
    return combined.index_add_(0, dispatch.token_ids, weighted)


class SwitchExperts(nn.Module):
    """`E` feed-forward networks held as stacked weights.

    Parameters: `wi` `[E, f, d]` (or `wi_0` and `wi_1` for a gated activation) and `wo` `[E, d, f]`. They are
    read as attributes of this module inside its own `forward`, which is what peft's `target_parameters` and
    expert sharding rely on.
    """

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.is_gated = config.is_gated_act
        shape_in = (config.num_experts, config.d_ff, config.d_model)
        if self.is_gated:
            self.wi_0 = nn.Parameter(torch.empty(shape_in))
            self.wi_1 = nn.Parameter(torch.empty(shape_in))
        else:
            self.wi = nn.Parameter(torch.empty(shape_in))
        self.wo = nn.Parameter(torch.empty(config.num_experts, config.d_model, config.d_ff))
        self.act = ACT2FN[config.dense_act_fn]
        self.dropout = nn.Dropout(config.experts_dropout_rate)

    def forward(self, hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Run each expert on its contiguous slice of tokens.

        Args:
            hidden_states: `[M, d]` tokens grouped by expert.
            tokens_per_expert: `[E]` length of each expert's slice.

        Returns:
            `[M, d]` expert outputs, in the same order.
        """
        outputs = hidden_states.new_empty(hidden_states.shape[0], self.wo.shape[1])
        start = 0
        for expert, count in enumerate(tokens_per_expert.tolist()):
            if count == 0:
                continue
            tokens = hidden_states[start : start + count]
            if self.is_gated:
                inner = self.act(nn.functional.linear(tokens, self.wi_0[expert]))
                inner = inner * nn.functional.linear(tokens, self.wi_1[expert])
            else:
                inner = self.act(nn.functional.linear(tokens, self.wi[expert]))
            inner = self.dropout(inner)
            outputs[start : start + count] = nn.functional.linear(inner.to(self.wo.dtype), self.wo[expert])
            start += count
        return outputs
