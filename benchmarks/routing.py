"""Routing choices side by side: one MoE layer, the same weights and tokens, routed per sequence or per batch.

Every variant is hf_switch's `SwitchSparseMLP` in training mode; only `SwitchConfig.routing_group` differs. Two
comparisons: the whole layer (routing, experts, router losses), whose expert work also changes with the number of
tokens each grouping keeps, and the router alone (scores, queues, capacity and losses), which is what grouping costs.
"""

import torch

from hf_switch import SwitchConfig
from hf_switch.modeling_switch import SwitchSparseMLP
from hf_switch.routing import routing_stats

from .layer import LayerCase
from .timing import compare

ROUTING_GROUPS = ("sequence", "batch", 256)


def _layers(case: LayerCase) -> dict[str, SwitchSparseMLP]:
    layers = {}
    for group in ROUTING_GROUPS:
        torch.manual_seed(0)  # the same weights for every grouping
        config = SwitchConfig(
            d_model=case.d_model,
            d_ff=case.d_ff,
            num_experts=case.num_experts,
            capacity_factor=case.capacity_factor,
            routing_group=group,
            dropout_rate=0.0,
        )
        layers[f"group={group}"] = SwitchSparseMLP(config).train()
    return layers


def routing_variants(case: LayerCase, backward: bool, router_only: bool) -> dict:
    """Callables for `compare`, one per routing group: a training forward of the layer (or of its router alone)
    and its router losses, backpropagating into the input and every weight when `backward`."""
    hidden = torch.randn(case.batch, case.length, case.d_model, requires_grad=backward)
    token_mask = torch.ones(case.batch, case.length, dtype=torch.bool)

    def run(layer):
        def forward():
            if router_only:
                decision = layer.router(hidden, token_mask)
                return decision.expert_weight.sum(), decision
            output, decision = layer(hidden, token_mask)
            return output.sum(), decision

        def step():
            with torch.set_grad_enabled(backward):
                total, decision = forward()
                stats = routing_stats(decision)
                if backward:
                    (total + stats.aux_loss + stats.z_loss).backward()
            for parameter in layer.parameters():
                parameter.grad = None
            hidden.grad = None

        return step

    return {name: run(layer) for name, layer in _layers(case).items()}


def kept_fractions(case: LayerCase) -> dict[str, float]:
    """Share of routed tokens each grouping keeps on the benchmark's input (the layer's expert work)."""
    torch.manual_seed(1)
    hidden = torch.randn(case.batch, case.length, case.d_model)
    token_mask = torch.ones(case.batch, case.length, dtype=torch.bool)
    with torch.no_grad():
        decisions = {name: layer.router(hidden, token_mask) for name, layer in _layers(case).items()}
    return {name: round(decision.kept.float().mean().item(), 4) for name, decision in decisions.items()}


def measure(case: LayerCase, backward: bool, rounds: int, router_only: bool) -> dict:
    return compare(routing_variants(case, backward, router_only), baseline="group=sequence", rounds=rounds)
