"""Top-k token-choice routing: the router module, expert capacity, and the router losses.

Shapes: `B` batch (one routing group per sequence), `T` tokens per sequence, `E` experts, `k` experts per token.
The functions here are pure so that tests can call them directly.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .configuration_switch import SwitchConfig


@dataclass
class RouterDecision:
    """What a router decided for a batch.

    Attributes:
        logits: `[B, T, E]` raw router logits, in the router's dtype.
        probs: `[B, T, E]` softmax of the logits, in the router's dtype.
        expert_index: `[B, T, k]` chosen experts, most probable first.
        expert_weight: `[B, T, k]` weight of each chosen expert's output, in the router's dtype.
        kept: `[B, T, k]` whether the token reaches that expert (a routed token within capacity).
        token_mask: `[B, T]` tokens that take part in routing (all, unless padding is ignored).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    expert_index: torch.Tensor
    expert_weight: torch.Tensor
    kept: torch.Tensor
    token_mask: torch.Tensor


@dataclass
class RoutingStats:
    """Losses and load of one sparse layer.

    Attributes:
        aux_loss: scalar load-balancing loss (equations 4-6 of the paper; 1.0 when perfectly balanced).
        z_loss: scalar router z-loss (mean squared log-partition of the logits).
        router_logits: `[B, T, E]` raw router logits.
        expert_counts: `[E]` token slots each expert filled.
        dropped_fraction: scalar fraction of routed token slots dropped by capacity.
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    router_logits: torch.Tensor
    expert_counts: torch.Tensor
    dropped_fraction: torch.Tensor


def expert_priority(expert_index: torch.Tensor, token_mask: torch.Tensor, num_experts: int, past_counts=None):
    """1-based rank of each (token, choice) in its expert's queue, in (position, choice) order within a sequence.

    Args:
        expert_index: `[B, T, k]` chosen experts.
        token_mask: `[B, T]` tokens that take part in routing; the others take no place in any queue.
        num_experts: `E`.
        past_counts: `[B, E]` tokens each expert already received from earlier positions (cached decoding).

    Returns:
        `[B, T, k]` ranks (0 for masked tokens).
    """
    batch, length, top_k = expert_index.shape
    one_hot = nn.functional.one_hot(expert_index, num_experts) * token_mask[:, :, None, None].long()
    one_hot = one_hot.reshape(batch, length * top_k, num_experts)
    ranks = one_hot.cumsum(dim=1)
    if past_counts is not None:
        ranks = ranks + past_counts[:, None, :]
    return (ranks * one_hot).sum(-1).reshape(batch, length, top_k)


def expert_capacity_per_position(
    config: SwitchConfig, token_mask: torch.Tensor, training: bool, causal: bool, past_tokens=None
):
    """Token slots per expert for each position, `[B, T]` (`None` when routing drops nothing).

    An absolute `expert_capacity` applies as is. A capacity factor scales the balanced share
    `top_k * n / E`, where `n` counts the sequence's routed tokens: all of them in the encoder, those up to and
    including each position when `causal` (the decoder), which keeps cached decoding exact.

    Args:
        token_mask: `[B, T]` tokens that take part in routing.
        past_tokens: `[B]` routed tokens at earlier positions (cached decoding).
    """
    if config.expert_capacity is not None:
        return torch.full(token_mask.shape, config.expert_capacity, device=token_mask.device)
    factor = config.capacity_factor if training else config.eval_capacity_factor
    if factor is None:
        return None
    counted = token_mask.long()
    if causal:
        counted = counted.cumsum(dim=1)
        if past_tokens is not None:
            counted = counted + past_tokens[:, None]
    else:
        counted = counted.sum(dim=1, keepdim=True).expand_as(token_mask)
    balanced_share = counted.double() * (config.router_top_k * factor / config.num_experts)
    return torch.ceil(balanced_share).long().clamp(min=config.min_expert_capacity)


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss `E * sum_e f_e * P_e`, per sequence and averaged over sequences.

    `f_e` is the fraction of a sequence's tokens that chose expert `e` (before capacity, over all k choices and
    divided by k) and `P_e` the mean router probability of `e`; both over the tokens in `token_mask`.

    Args:
        probs: `[B, T, E]` router probabilities.
        expert_index: `[B, T, k]` chosen experts.
        token_mask: `[B, T]`.
    """
    num_experts, top_k = probs.shape[-1], expert_index.shape[-1]
    mask = token_mask.to(torch.float32)[:, :, None]
    tokens = mask.sum(dim=1)
    chose = nn.functional.one_hot(expert_index, num_experts).amax(dim=-2).to(torch.float32)
    fraction_routed = (chose * mask).sum(dim=1) / tokens.clamp(min=1) / top_k
    mean_prob = (probs.to(torch.float32) * mask).sum(dim=1) / tokens.clamp(min=1)
    per_sequence = (fraction_routed * mean_prob).sum(dim=-1) * num_experts
    has_tokens = tokens.squeeze(-1) > 0
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over routed tokens of `logsumexp(logits)^2`.

    Args:
        logits: `[B, T, E]`.
        token_mask: `[B, T]`.
    """
    log_partition = torch.logsumexp(logits.to(torch.float32), dim=-1)
    mask = token_mask.to(torch.float32)
    return (log_partition.square() * mask).sum() / mask.sum().clamp(min=1)


def routing_stats(decision: RouterDecision) -> RoutingStats:
    """Losses and load of one layer's routing decision."""
    num_experts = decision.probs.shape[-1]
    routed = decision.token_mask[:, :, None].expand_as(decision.kept)
    kept_experts = decision.expert_index[decision.kept]
    expert_counts = torch.bincount(kept_experts, minlength=num_experts)
    dropped = (routed & ~decision.kept).sum().to(torch.float32)
    return RoutingStats(
        aux_loss=load_balancing_loss(decision.probs, decision.expert_index, decision.token_mask),
        z_loss=router_z_loss(decision.logits, decision.token_mask),
        router_logits=decision.logits,
        expert_counts=expert_counts,
        dropped_fraction=dropped / routed.sum().clamp(min=1),
    )


class SwitchRouter(nn.Module):
    """Scores tokens against experts and picks each token's top-k experts within capacity.

    The projection runs in `config.router_dtype` whatever the model's dtype ("selective precision").
    """

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.config = config
        self.classifier = nn.Linear(config.d_model, config.num_experts, bias=config.router_bias)

    def forward(self, hidden_states, token_mask, causal=False, past_expert_index=None) -> RouterDecision:
        """Route a batch.

        Args:
            hidden_states: `[B, T, d_model]`.
            token_mask: `[B, T]` bool, tokens that take part in routing.
            causal: whether capacity is counted per prefix (the decoder).
            past_expert_index: `[B, T_past, k]` experts chosen at earlier positions, -1 where nothing was routed
                (cached decoding).
        """
        router_dtype = getattr(torch, self.config.router_dtype)
        router_input = hidden_states.to(router_dtype)
        if self.training and self.config.router_jitter_noise > 0:
            noise = self.config.router_jitter_noise
            router_input = router_input * torch.empty_like(router_input).uniform_(1.0 - noise, 1.0 + noise)
        bias = None if self.classifier.bias is None else self.classifier.bias.to(router_dtype)
        logits = nn.functional.linear(router_input, self.classifier.weight.to(router_dtype), bias)
        probs = nn.functional.softmax(logits, dim=-1, dtype=router_dtype)

        top_k = self.config.router_top_k
        expert_weight, expert_index = torch.topk(probs, top_k, dim=-1)
        if top_k > 1:
            expert_weight = expert_weight / expert_weight.sum(dim=-1, keepdim=True)

        past_counts = past_tokens = None
        if past_expert_index is not None:
            past_counts = _count_per_expert(past_expert_index, self.config.num_experts)
            past_tokens = (past_expert_index[:, :, 0] >= 0).sum(dim=1)
        kept = token_mask[:, :, None].expand_as(expert_index)
        capacity = expert_capacity_per_position(self.config, token_mask, self.training, causal, past_tokens)
        if capacity is not None:
            priority = expert_priority(expert_index, token_mask, self.config.num_experts, past_counts)
            kept = kept & (priority <= capacity[:, :, None])
        return RouterDecision(logits, probs, expert_index, expert_weight, kept, token_mask)


def _count_per_expert(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[B, E]` number of entries of `expert_index` (`[B, T, k]`, -1 for none) naming each expert."""
    counts = torch.zeros(expert_index.shape[0], num_experts + 1, dtype=torch.long, device=expert_index.device)
    flat = expert_index.reshape(expert_index.shape[0], -1)
    counts.scatter_add_(1, flat.clamp(min=-1) % (num_experts + 1), torch.ones_like(flat))
    return counts[:, :num_experts]
