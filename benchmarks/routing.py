"""Routing choices side by side: one MoE layer, the same weights and tokens, routed per sequence or per batch.

Every variant is hf_switch's `SwitchSparseMLP` in training mode; only `SwitchConfig.routing_group` differs, so the
ratios are the cost of counting capacity and the load-balancing loss over the whole batch in position-major order.
"""

import torch

from hf_switch import SwitchConfig
from hf_switch.modeling_switch import SwitchSparseMLP
from hf_switch.routing import routing_stats

from .layer import LayerCase
from .timing import compare

ROUTING_GROUPS = ("sequence", "batch", 256)


def routing_variants(case: LayerCase, backward: bool) -> dict:
    """Callables for `compare`, one per routing group; each routes, runs the experts and computes the router losses
    (what a training forward does), backpropagating into the input and every weight when `backward`."""
    layers = {}
    for group in ROUTING_GROUPS:
        torch.manual_seed(0)
        config = SwitchConfig(
            d_model=case.d_model,
            d_ff=case.d_ff,
            num_experts=case.num_experts,
            capacity_factor=case.capacity_factor,
            routing_group=group,
            dropout_rate=0.0,
        )
        layers[f"group={group}"] = SwitchSparseMLP(config).train()
    hidden = torch.randn(case.batch, case.length, case.d_model, requires_grad=backward)
    token_mask = torch.ones(case.batch, case.length, dtype=torch.bool)

    def run(layer):
        def step():
            with torch.set_grad_enabled(backward):
                output, decision = layer(hidden, token_mask)
                stats = routing_stats(decision)
                if backward:
                    (output.sum() + stats.aux_loss + stats.z_loss).backward()
            for parameter in layer.parameters():
                parameter.grad = None
            hidden.grad = None

        return step

    return {name: run(layer) for name, layer in layers.items()}


def measure(case: LayerCase, backward: bool, rounds: int) -> dict:
    return compare(routing_variants(case, backward), baseline="group=sequence", rounds=rounds)
