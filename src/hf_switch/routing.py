"""Routing: the router module (top-k token choice, or expert choice), routing groups, expert capacity, the router
losses, and the auxiliary-loss-free expert bias.

Shapes: `B` batch, `T` tokens per sequence, `E` experts, `k` experts per token, `G` routing groups of `N` tokens.
Expert capacity and the load-balancing loss are counted per routing group (`SwitchConfig.routing_group`). The
functions here are pure so that tests can call them directly.
"""

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from .configuration_switch import SwitchConfig


@dataclass(frozen=True)
class RoutingGroups:
    """How the tokens of a `[B, T]` batch form routing groups, each ordered position-major.

    `spec` is `SwitchConfig.routing_group`: "sequence" (each sequence is a group, `G = B`, `N = T`), "batch" (one group
    of all `B * T` tokens: position 0 of every sequence, then position 1, ...), or an integer `S` (that position-major
    order cut into groups of `S` tokens, the last one filled up with tokens that take part in nothing). Position-major
    queues mean that whether a token keeps its expert never depends on later positions of its own sequence.
    """

    spec: str | int
    batch: int
    length: int

    @property
    def num_groups(self) -> int:
        if self.spec == "sequence":
            return self.batch
        if self.spec == "batch":
            return 1
        return math.ceil(self.batch * self.length / self.spec)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """`[B, T, ...]` -> `[G, N, ...]` in queue order; filler tokens of an integer size hold zeros (False)."""
        if self.spec == "sequence":
            return tensor
        flat = tensor.transpose(0, 1).reshape(self.batch * self.length, *tensor.shape[2:])
        if self.spec == "batch":
            return flat.unsqueeze(0)
        filler = self.num_groups * self.spec - flat.shape[0]
        flat = torch.cat([flat, flat.new_zeros((filler, *flat.shape[1:]))])
        return flat.reshape(self.num_groups, self.spec, *flat.shape[1:])

    def scatter(self, grouped: torch.Tensor) -> torch.Tensor:
        """`[G, N, ...]` -> `[B, T, ...]`, the inverse of `gather`."""
        if self.spec == "sequence":
            return grouped
        flat = grouped.reshape(-1, *grouped.shape[2:])[: self.batch * self.length]
        return flat.reshape(self.length, self.batch, *flat.shape[1:]).transpose(0, 1)

    def tokens_per_group(self, token_mask: torch.Tensor) -> torch.Tensor:
        """`[B, T]`: routed tokens in each token's group."""
        grouped = self.gather(token_mask)
        return self.scatter(grouped.sum(dim=1, keepdim=True).expand_as(grouped))

    def tokens_up_to_position(self, token_mask: torch.Tensor, past_tokens=None) -> torch.Tensor:
        """`[B, T]`: routed tokens of each token's group at its position or before (`past_tokens` `[G]` earlier ones).

        Defined for sequence and batch groups, whose members at a position are all in one group; the count at a
        position then is the same in a forward over the whole sequence and in cached decoding.
        """
        if self.spec == "sequence":
            counted = token_mask.long().cumsum(dim=1)
        else:
            counted = token_mask.long().sum(dim=0).cumsum(dim=0)[None, :].expand_as(token_mask)
        return counted if past_tokens is None else counted + past_tokens[:, None]

    def past_per_group(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """`[B, ...]` counts of the cached positions of each sequence -> `[G, ...]` counts of each group."""
        return per_sequence if self.spec == "sequence" else per_sequence.sum(dim=0, keepdim=True)


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
        groups: the routing groups capacity and the load-balancing loss were counted over.
        experts_choose: whether the experts chose the tokens (expert choice): then `k = E`, `expert_index` names
            every expert at every token and `kept` says which experts took the token.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    expert_index: torch.Tensor
    expert_weight: torch.Tensor
    kept: torch.Tensor
    token_mask: torch.Tensor
    groups: RoutingGroups
    experts_choose: bool = False

    def rejoined(self, logits: torch.Tensor) -> "RouterDecision":
        """This decision with `logits`, the same values returned by a layer as a tensor of its own, and with the
        probabilities recomputed from them where only `logits` carries a gradient path: under reentrant activation
        checkpointing a layer runs without gradients and only the tensors it returns are reconnected, so that the
        router losses reach the router through `logits` alone."""
        if logits.requires_grad and not self.probs.requires_grad:
            return replace(self, logits=logits, probs=nn.functional.softmax(logits, dim=-1, dtype=logits.dtype))
        return replace(self, logits=logits)


@dataclass
class RoutingStats:
    """Losses and load of one sparse layer.

    Attributes:
        aux_loss: scalar load-balancing loss (equations 4-6 of the paper; 1.0 when perfectly balanced).
        z_loss: scalar router z-loss (mean squared log-partition of the logits).
        router_logits: `[B, T, E]` raw router logits.
        expert_counts: `[E]` token slots each expert filled.
        dropped_fraction: scalar fraction of routed token slots dropped by capacity (with expert choice: of routed
            tokens that no expert took).
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    router_logits: torch.Tensor
    expert_counts: torch.Tensor
    dropped_fraction: torch.Tensor


def expert_priority(expert_index: torch.Tensor, token_mask: torch.Tensor, num_experts: int, past_counts=None):
    """1-based rank of each (token, choice) in its expert's queue, in (token, choice) order within a group.

    Args:
        expert_index: `[G, N, k]` chosen experts, tokens in queue order (`RoutingGroups.gather`).
        token_mask: `[G, N]` tokens that take part in routing; the others take no place in any queue.
        num_experts: `E`.
        past_counts: `[G, E]` tokens each expert already received from earlier positions (cached decoding).

    Returns:
        `[G, N, k]` ranks (0 for masked tokens).
    """
    groups, length, top_k = expert_index.shape
    one_hot = nn.functional.one_hot(expert_index, num_experts) * token_mask[:, :, None, None].long()
    one_hot = one_hot.reshape(groups, length * top_k, num_experts)
    ranks = one_hot.cumsum(dim=1)
    if past_counts is not None:
        ranks = ranks + past_counts[:, None, :]
    return (ranks * one_hot).sum(-1).reshape(groups, length, top_k)


def expert_capacity(
    config: SwitchConfig,
    groups: RoutingGroups,
    token_mask: torch.Tensor,
    training: bool,
    causal: bool,
    past_tokens=None,
):
    """Token slots per expert for each token's group, `[B, T]` (`None` when routing drops nothing).

    An absolute `expert_capacity` applies as is. A capacity factor scales the balanced share `top_k * n / E`, where
    `n` counts the group's routed tokens: all of them, except in a decoder that is not training, where `n` counts the
    group's tokens at the token's position or before. That per-prefix count is what cached decoding can know, so
    evaluation and `generate()` route a cached step exactly as a forward over the whole sequence.

    Args:
        token_mask: `[B, T]` tokens that take part in routing.
        past_tokens: `[G]` routed tokens of each group at earlier positions (cached decoding).
    """
    if config.expert_capacity is not None:
        return torch.full(token_mask.shape, config.expert_capacity, device=token_mask.device)
    factor = config.capacity_factor if training else config.eval_capacity_factor
    if factor is None:
        return None
    if causal and not training:
        if isinstance(groups.spec, int):
            raise ValueError(
                f"SwitchConfig.routing_group={groups.spec!r} with eval_capacity_factor={factor!r}: a decoder outside "
                "training counts capacity per prefix (as cached decoding must), which groups of a fixed token count "
                "do not align with. Use routing_group='batch' or 'sequence', or eval_capacity_factor=None (dropless)."
            )
        counted = groups.tokens_up_to_position(token_mask, past_tokens)
    elif past_tokens is not None:
        raise ValueError(
            f"A cached decoder forward in training mode with capacity_factor={factor!r}: training counts capacity "
            "over the whole routing group, which later positions change, so cached steps cannot route as one forward. "
            "Call model.eval() before decoding with a cache, or set capacity_factor=None (dropless)."
        )
    else:
        counted = groups.tokens_per_group(token_mask)
    balanced_share = counted.double() * (config.router_top_k * factor / config.num_experts)
    return torch.ceil(balanced_share).long().clamp(min=config.min_expert_capacity)


def experts_choose(probs: torch.Tensor, token_mask: torch.Tensor, groups: RoutingGroups, capacity_factor: float):
    """Expert-choice routing (Zhou et al. 2022): each expert takes the `ceil(capacity_factor * n / E)` tokens of its
    group (`n` routed tokens) that give it the highest probability. A token may be taken by several experts or none.

    Args:
        probs: `[B, T, E]` router probabilities.
        token_mask: `[B, T]` tokens that take part in routing; no expert takes the others.

    Returns:
        `[B, T, E]` bool, whether expert `e` took token `(b, t)`.
    """
    num_experts = probs.shape[-1]
    mask = groups.gather(token_mask)
    tokens = mask.sum(dim=1)
    capacity = torch.minimum(torch.ceil(tokens.double() * (capacity_factor / num_experts)).long(), tokens)
    scores = groups.gather(probs).masked_fill(~mask[:, :, None], -math.inf).transpose(1, 2)
    taken = min(int(capacity.max()), scores.shape[-1])
    chosen = torch.topk(scores, taken, dim=-1).indices
    within_capacity = torch.arange(taken, device=probs.device) < capacity[:, None, None]
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, within_capacity.expand_as(chosen))
    return groups.scatter(kept.transpose(1, 2)) & token_mask[:, :, None]


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss `E * sum_e f_e * P_e`, per routing group and averaged over groups.

    `f_e` is the fraction of a group's tokens that chose expert `e` (before capacity, over all k choices and
    divided by k) and `P_e` the mean router probability of `e`; both over the tokens in `token_mask`.

    Args:
        probs: `[G, N, E]` router probabilities.
        expert_index: `[G, N, k]` chosen experts.
        token_mask: `[G, N]`.
    """
    num_experts, top_k = probs.shape[-1], expert_index.shape[-1]
    mask = token_mask.to(torch.float32)[:, :, None]
    tokens = mask.sum(dim=1)
    chose = nn.functional.one_hot(expert_index, num_experts).amax(dim=-2).to(torch.float32)
    fraction_routed = (chose * mask).sum(dim=1) / tokens.clamp(min=1) / top_k
    mean_prob = (probs.to(torch.float32) * mask).sum(dim=1) / tokens.clamp(min=1)
    per_group = (fraction_routed * mean_prob).sum(dim=-1) * num_experts
    has_tokens = tokens.squeeze(-1) > 0
    return (per_group * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def global_load_balancing_loss(probs: torch.Tensor, token_mask: torch.Tensor, expert_fraction: torch.Tensor):
    """`E * sum_e f_e * P_e` with `f_e` given: the fraction of routed choices over the whole (global) batch.

    `f_e` is a count and carries no gradient; `P_e`, the mean router probability of `e` over this forward's tokens in
    `token_mask`, does, as in the per-group loss (Qiu et al. 2025, global-batch load balancing).

    Args:
        probs: `[B, T, E]` router probabilities.
        token_mask: `[B, T]`.
        expert_fraction: `[E]`, summing to 1.
    """
    mask = token_mask.to(torch.float32)[:, :, None]
    mean_prob = (probs.to(torch.float32) * mask).sum(dim=(0, 1)) / mask.sum().clamp(min=1)
    return (expert_fraction.to(torch.float32) * mean_prob).sum() * probs.shape[-1]


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over routed tokens of `logsumexp(logits)^2`.

    Args:
        logits: `[B, T, E]`.
        token_mask: `[B, T]`.
    """
    log_partition = torch.logsumexp(logits.to(torch.float32), dim=-1)
    mask = token_mask.to(torch.float32)
    return (log_partition.square() * mask).sum() / mask.sum().clamp(min=1)


def chosen_expert_counts(decision: RouterDecision) -> torch.Tensor:
    """`[E]` routed (token, choice) pairs that chose each expert, before capacity (with expert choice: the tokens
    each expert took)."""
    chosen = decision.kept if decision.experts_choose else decision.token_mask
    return torch.bincount(decision.expert_index[chosen].flatten(), minlength=decision.probs.shape[-1])


def routing_stats(decision: RouterDecision, expert_fraction: torch.Tensor | None = None) -> RoutingStats:
    """Losses and load of one layer's routing decision.

    Args:
        expert_fraction: `[E]` share of the global batch's routed choices per expert; with it the load-balancing loss
            is the global-batch one (`SwitchConfig.load_balancing_scope="global_batch"`), else per routing group.
    """
    num_experts = decision.probs.shape[-1]
    kept_experts = decision.expert_index[decision.kept]
    expert_counts = torch.bincount(kept_experts, minlength=num_experts)
    if decision.experts_choose:
        # Balanced by construction: no load-balancing loss. A dropped token is one that no expert took.
        routed = decision.token_mask
        dropped = (routed & ~decision.kept.any(dim=-1)).sum().to(torch.float32)
        aux_loss = decision.probs.new_zeros((), dtype=torch.float32)
    else:
        routed = decision.token_mask[:, :, None].expand_as(decision.kept)
        dropped = (routed & ~decision.kept).sum().to(torch.float32)
        if expert_fraction is None:
            groups = decision.groups
            aux_loss = load_balancing_loss(
                groups.gather(decision.probs), groups.gather(decision.expert_index), groups.gather(decision.token_mask)
            )
        else:
            aux_loss = global_load_balancing_loss(decision.probs, decision.token_mask, expert_fraction)
    return RoutingStats(
        aux_loss=aux_loss,
        z_loss=router_z_loss(decision.logits, decision.token_mask),
        router_logits=decision.logits,
        expert_counts=expert_counts,
        dropped_fraction=dropped / routed.sum().clamp(min=1),
    )


class RouterProjection(nn.Linear):
    """The router's projection onto the experts, computed in the dtype of its input (the router dtype) whatever the
    dtype of its weights.

    Its weights are float32 unless something else made them lower precision: a model cast by hand, or FSDP2
    gathering every parameter in bfloat16 under mixed precision. Casting a copy in the forward leaves the parameters
    as their owner made them (converting the module in place, as transformers' Switch router does, swaps FSDP2's
    gathered parameter for another tensor, and its backward fails on gradients of mixed dtypes); being a module call,
    hooks, peft and accelerate's offloading still see it.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(input.dtype)
        return nn.functional.linear(input, self.weight.to(input.dtype), bias)


class SwitchRouter(nn.Module):
    """Scores tokens against experts and picks each token's top-k experts within capacity.

    The projection runs in `config.router_dtype` whatever the model's dtype or an autocast region ("selective
    precision"; `from_pretrained` in a lower precision keeps its weights in float32 too). In training it keeps
    `step_expert_counts`, `[E]` routed choices per expert summed over the micro-batches and processes of the current
    optimizer step, which the global-batch load-balancing loss and the expert bias read (see `end_balancing_step`).
    With `config.router_expert_bias` it holds `expert_bias`, `[E]` float32, added to the probabilities for choosing
    experts only; a model cast to a lower precision casts it too (the Trainer's and FSDP2's mixed precision keep it
    in float32).
    """

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.config = config
        self.classifier = RouterProjection(config.d_model, config.num_experts, bias=config.router_bias)
        self.experts_choose = not config.is_decoder and config.encoder_router_type == "experts_choose"
        # Integer counts: a model cast to bfloat16 would round float counts above 256.
        self.register_buffer("step_expert_counts", torch.zeros(config.num_experts, dtype=torch.long), persistent=False)
        # An expert's bias is the same for all tokens, so it cannot change which tokens that expert chooses.
        self.uses_expert_bias = config.router_expert_bias and not self.experts_choose
        if self.uses_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, hidden_states, token_mask, causal=False, past_expert_index=None) -> RouterDecision:
        """Route a batch.

        Args:
            hidden_states: `[B, T, d_model]`.
            token_mask: `[B, T]` bool, tokens that take part in routing.
            causal: whether this is a decoder (capacity per prefix outside training).
            past_expert_index: `[B, T_past, k]` experts chosen at earlier positions, -1 where nothing was routed
                (cached decoding).
        """
        router_dtype = getattr(torch, self.config.router_dtype)
        router_input = hidden_states.to(router_dtype)
        if self.training and self.config.router_jitter_noise > 0:
            noise = self.config.router_jitter_noise
            router_input = router_input * torch.empty_like(router_input).uniform_(1.0 - noise, 1.0 + noise)
        # Autocast (Trainer's --bf16 / --fp16) would run the projection in its low precision whatever the weights'.
        with torch.autocast(router_input.device.type, enabled=False):
            logits = self.classifier(router_input)
        probs = nn.functional.softmax(logits, dim=-1, dtype=router_dtype)

        groups = RoutingGroups(self.config.routing_group, *token_mask.shape)
        if self.experts_choose:
            kept = experts_choose(probs, token_mask, groups, self.config.expert_choice_capacity_factor)
            every_expert = torch.arange(self.config.num_experts, device=probs.device).expand_as(probs)
            return RouterDecision(logits, probs, every_expert, probs, kept, token_mask, groups, experts_choose=True)

        top_k = self.config.router_top_k
        if self.uses_expert_bias:
            # The bias picks the experts; the gates stay the unbiased probabilities, so it never enters a gradient.
            expert_index = torch.topk(probs + self.expert_bias.to(router_dtype), top_k, dim=-1).indices
            expert_weight = probs.gather(-1, expert_index)
        else:
            expert_weight, expert_index = torch.topk(probs, top_k, dim=-1)
        if top_k > 1:
            expert_weight = expert_weight / expert_weight.sum(dim=-1, keepdim=True)

        past_counts = past_tokens = None
        if past_expert_index is not None:
            if isinstance(groups.spec, int) and self._drops_tokens():
                raise ValueError(
                    f"SwitchConfig.routing_group={groups.spec!r}: cached decoding cannot tell which fixed-size group "
                    "a new position falls in for the capacity count. Use routing_group='batch' or 'sequence', or "
                    "route without capacity (expert_capacity=None and a capacity factor of None)."
                )
            past_counts = groups.past_per_group(_count_per_expert(past_expert_index, self.config.num_experts))
            past_tokens = groups.past_per_group((past_expert_index[:, :, 0] >= 0).sum(dim=1))
        kept = token_mask[:, :, None].expand_as(expert_index)
        capacity = expert_capacity(self.config, groups, token_mask, self.training, causal, past_tokens)
        if capacity is not None:
            priority = expert_priority(
                groups.gather(expert_index), groups.gather(token_mask), self.config.num_experts, past_counts
            )
            kept = kept & (groups.scatter(priority) <= capacity[:, :, None])
        return RouterDecision(logits, probs, expert_index, expert_weight, kept, token_mask, groups)

    def _drops_tokens(self) -> bool:
        factor = self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        return self.config.expert_capacity is not None or factor is not None


def end_balancing_step(model: nn.Module) -> None:
    """Close an optimizer step for routing: move each router's expert bias against the step's load, then forget the
    per-step expert counts of every router in `model`.

    Call it after each optimizer step (the Trainer does, through `training.BalancingStepCallback`), so that the
    global-batch load-balancing loss counts the micro-batches of one step only and the bias moves once per step. The
    counts were summed over processes in the forward, so every process moves its bias alike. A frozen router (as
    LoRA finetuning leaves it unless the router is trained) keeps its bias too: an adapter, which holds no router,
    then reproduces the finetuned model on its base.
    """
    for module in model.modules():
        if isinstance(module, SwitchRouter):
            if module.uses_expert_bias and module.classifier.weight.requires_grad:
                update_expert_bias(module.expert_bias, module.step_expert_counts, module.config.router_bias_update_rate)
            module.step_expert_counts.zero_()


def update_expert_bias(expert_bias: torch.Tensor, expert_counts: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing step (Wang et al. 2024): `bias += rate * sign(mean load - load)`, in place.

    The step is centred (as torchtitan's is) so the biases do not drift together: adding one constant to every
    expert's bias changes no choice. Nothing moves after a step that routed no token.

    Args:
        expert_bias: `[E]` float bias.
        expert_counts: `[E]` routed choices per expert over the optimizer step.
    """
    if rate == 0 or expert_counts.sum() == 0:
        return
    load = expert_counts.to(torch.float32)
    step = torch.sign(load.mean() - load)
    expert_bias.add_(rate * (step - step.mean()))


def _count_per_expert(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[B, E]` number of entries of `expert_index` (`[B, T, k]`, -1 for none) naming each expert."""
    counts = torch.zeros(expert_index.shape[0], num_experts + 1, dtype=torch.long, device=expert_index.device)
    flat = expert_index.reshape(expert_index.shape[0], -1)
    counts.scatter_add_(1, flat.clamp(min=-1) % (num_experts + 1), torch.ones_like(flat))
    return counts[:, :num_experts]
