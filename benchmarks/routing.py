"""Routing choices side by side: one MoE layer, the same weights and tokens, routed per sequence or per batch, and
per batch with the auxiliary-loss-free expert bias.

Every variant is hf_switch's `SwitchSparseMLP` in training mode; only `SwitchConfig.routing_group` and
`router_expert_bias` differ. Two comparisons: the whole layer (routing, experts, router losses), whose expert work also
changes with the number of tokens each grouping keeps, and the router alone (scores, queues, capacity and losses),
which is what grouping costs. The bias variant also pays what the model pays for it per step: the biased selection,
counting the step's choices per expert, and the step's bookkeeping (`end_balancing_step`; the sign update itself, a
few operations on `E` numbers, is skipped at rate 0).
"""

import torch

from hf_switch.modeling_switch import SwitchSparseMLP
from hf_switch.routing import chosen_expert_counts, end_balancing_step, routing_stats

from .layer import LayerCase
from .timing import compare

VARIANTS = {
    "group=sequence": dict(routing_group="sequence"),
    "group=batch": dict(routing_group="batch"),
    "group=256": dict(routing_group=256),
    # The bias stays at zero (update rate 0), so that it routes the same tokens as "group=batch": on the repeated
    # input of a benchmark a moving bias would balance the load and change the experts' work.
    "group=batch+bias": dict(routing_group="batch", router_expert_bias=True, router_bias_update_rate=0.0),
}


def _layers(case: LayerCase) -> dict[str, SwitchSparseMLP]:
    layers = {}
    for name, routing in VARIANTS.items():
        torch.manual_seed(0)  # the same weights for every variant
        layers[name] = SwitchSparseMLP(case.config(**routing)).train()
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
            if layer.router.config.router_expert_bias:
                layer.router.step_expert_counts += chosen_expert_counts(decision)
                end_balancing_step(layer)
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
