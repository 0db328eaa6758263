"""One MoE layer against the dense FFN floor, balanced experts without routing, and transformers' layer; hf_switch's
layer also with transformers' registered expert kernels (`experts_implementation` "batched_mm" and "grouped_mm").

Every variant holds the same weights and sees the same tokens; "fwd+bwd" backpropagates `output.sum()` into the
input and every weight, and drops the gradients afterwards as `optimizer.zero_grad()` does.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

from hf_switch import SwitchConfig
from hf_switch.experts import TRANSFORMERS_EXPERTS, Dispatch
from hf_switch.modeling_switch import SwitchSparseMLP

from .timing import compare

# transformers' batched_mm gathers one copy of an expert's weight matrix per token (`[tokens, d_ff, d_model]`): a
# decoding kernel. Cases whose gather would exceed this leave it out.
BATCHED_MM_BYTES = 2**30


@dataclass
class LayerCase:
    d_model: int
    d_ff: int
    batch: int
    length: int
    num_experts: int
    capacity_factor: float | None  # None: dropless

    @property
    def name(self) -> str:
        capacity = "dropless" if self.capacity_factor is None else f"cf{self.capacity_factor}"
        return f"E{self.num_experts}-{capacity}"

    def config(self, **overrides) -> SwitchConfig:
        """The case's layer as a `SwitchConfig`, without dropout."""
        return SwitchConfig(
            d_model=self.d_model,
            d_ff=self.d_ff,
            num_experts=self.num_experts,
            capacity_factor=self.capacity_factor,
            dropout_rate=0.0,
            **overrides,
        )


def build_layers(case: LayerCase, seed: int = 0) -> dict[str, nn.Module]:
    """hf_switch's layer, transformers' layer with the same weights, and the dense FFN of one expert's size."""
    torch.manual_seed(seed)
    config = case.config(router_jitter_noise=0.0)
    ours = SwitchSparseMLP(config)
    nn.init.normal_(ours.router.classifier.weight, std=(0.1 / case.d_model) ** 0.5)
    nn.init.normal_(ours.experts.wi, std=case.d_model**-0.5)
    nn.init.normal_(ours.experts.wo, std=case.d_ff**-0.5)

    capacity = case.length
    if case.capacity_factor is not None:
        capacity = max(config.min_expert_capacity, -(-case.length * case.capacity_factor // case.num_experts))
    theirs = SwitchTransformersSparseMLP(
        SwitchTransformersConfig(
            d_model=case.d_model,
            d_ff=case.d_ff,
            num_experts=case.num_experts,
            expert_capacity=int(capacity),
            dropout_rate=0.0,
            router_jitter_noise=0.0,
        )
    )
    with torch.no_grad():
        theirs.router.classifier.weight.copy_(ours.router.classifier.weight)
        for expert in range(case.num_experts):
            theirs.experts[f"expert_{expert}"].wi.weight.copy_(ours.experts.wi[expert])
            theirs.experts[f"expert_{expert}"].wo.weight.copy_(ours.experts.wo[expert])

    dense = nn.Sequential(
        nn.Linear(case.d_model, case.d_ff, bias=False), nn.ReLU(), nn.Linear(case.d_ff, case.d_model, bias=False)
    )
    with torch.no_grad():
        dense[0].weight.copy_(ours.experts.wi[0])
        dense[2].weight.copy_(ours.experts.wo[0])
    return {"ours": ours.train(), "transformers": theirs.train(), "dense": dense.train()}


def layer_variants(case: LayerCase, backward: bool) -> dict:
    """Callables for `compare`: dense floor, balanced experts only, hf_switch's layer, transformers' layer."""
    layers = build_layers(case)
    tokens = case.batch * case.length
    hidden = torch.randn(case.batch, case.length, case.d_model, requires_grad=backward)
    token_mask = torch.ones(case.batch, case.length, dtype=torch.bool)
    counts = torch.full((case.num_experts,), tokens // case.num_experts, dtype=torch.long)
    counts[: tokens % case.num_experts] += 1
    balanced = Dispatch(token_ids=torch.arange(tokens), weights=None, tokens_per_expert=counts)
    experts = layers["ours"].experts

    def run(forward, *modules, layout="auto", implementation="eager"):
        def step():
            experts.layout = layout
            layers["ours"].config._experts_implementation_internal = implementation
            with torch.set_grad_enabled(backward):
                output = forward()
                if backward:
                    output.sum().backward()
            for module in modules:
                for parameter in module.parameters():
                    parameter.grad = None
            hidden.grad = None

        return step

    return {
        "dense": run(lambda: layers["dense"](hidden), layers["dense"]),
        "balanced_experts": run(lambda: experts(hidden.reshape(tokens, -1), balanced), experts),
        "hf_switch": run(lambda: layers["ours"](hidden, token_mask)[0], layers["ours"]),
        "hf_switch_grouped": run(lambda: layers["ours"](hidden, token_mask)[0], layers["ours"], layout="grouped"),
        "hf_switch_padded": run(lambda: layers["ours"](hidden, token_mask)[0], layers["ours"], layout="padded"),
        **{
            f"hf_switch_{name}": run(lambda: layers["ours"](hidden, token_mask)[0], layers["ours"], implementation=name)
            for name in TRANSFORMERS_EXPERTS
            if name != "batched_mm" or tokens * case.d_ff * case.d_model * 4 <= BATCHED_MM_BYTES
        },
        "transformers": run(lambda: layers["transformers"](hidden), layers["transformers"]),
    }


def measure(case: LayerCase, backward: bool, rounds: int) -> dict:
    return compare(layer_variants(case, backward), baseline="dense", rounds=rounds)
