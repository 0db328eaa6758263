"""LoRA on the experts, applied to the rows routed to each expert.

`SwitchExpertsLora` wraps a `SwitchExperts` module as a peft LoRA layer (peft's extension point for custom modules,
`LoraConfig._register_custom_module`). Each adapter holds, for every stacked expert weight `W` `[E, out, in]` of
the module, `A` `[E, r, in]` and `B` `[E, out, r]`, and expert `e`'s product becomes

    x W_e^T + s (dropout(x) A_e^T) B_e^T        (s = lora_alpha / r)

computed inside the experts' own kernels on the rows routed to `e`, in whichever layout (grouped or padded) the call
chose. `B_e A_e` is never formed for all experts, which is what peft's `target_parameters` path does on every forward.
"""

import math

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .expert_kernels import GradientMemory

# LoraConfig fields a stacked-expert adapter cannot honour, with the value it needs.
UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False}


class SwitchExpertsLora(nn.Module, LoraLayer):
    """A LoRA layer over every stacked weight of a `SwitchExperts` module (`wi` or `wi_0`/`wi_1`, and `wo`).

    Parameters per adapter: `lora_A[adapter][name]` `[E_local, r, in]` and `lora_B[adapter][name]`
    `[E_local, out, r]` for each weight `name`; with expert parallelism each rank holds its own experts' adapters.
    """

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        for field, allowed in UNSUPPORTED.items():
            value = getattr(config, field)
            if value != allowed:
                raise ValueError(
                    f"LoraConfig.{field}={value!r} is not supported on Switch experts (allowed: {allowed!r})."
                )
        self.gradient_memory: dict[tuple[str, str, str], GradientMemory] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        width = module.wo.shape[1]  # the experts map d_model to d_model
        return width, width

    def stacked_weights(self) -> dict[str, nn.Parameter]:
        """The base module's stacked expert weights by name, each `[E_local, out, in]`."""
        return dict(self.get_base_layer().named_parameters(recurse=False))

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"LoraConfig.r={r}: must be a positive integer.")
        if config.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"LoraConfig.init_lora_weights={config.init_lora_weights!r} is not supported on Switch experts "
                "(allowed: True, False, 'gaussian')."
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_dropout[adapter_name] = dropout
        self.lora_A[adapter_name] = nn.ParameterDict()
        self.lora_B[adapter_name] = nn.ParameterDict()
        for name, weight in self.stacked_weights().items():
            experts, out_features, in_features = weight.shape
            self.lora_A[adapter_name][name] = nn.Parameter(weight.new_empty(experts, r, in_features))
            self.lora_B[adapter_name][name] = nn.Parameter(weight.new_empty(experts, out_features, r))
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        hold_adapters = getattr(self.get_base_layer(), "hold_adapters", None)
        if hold_adapters is not None:  # expert parallelism: the factors are this rank's experts'
            hold_adapters(self)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        """peft's initialisation of `nn.Linear` adapters, expert by expert: `A` as `nn.Linear(in, r)` (or normal
        with std 1/r for "gaussian"), `B` zero, so a fresh adapter changes nothing."""
        if init_lora_weights is False:
            return
        for name, weight_a in self.lora_A[adapter_name].items():
            if init_lora_weights == "gaussian":
                nn.init.normal_(weight_a, std=1 / self.r[adapter_name])
            else:  # kaiming_uniform_(a=sqrt(5)) of an `[r, in]` weight
                bound = 1 / math.sqrt(weight_a.shape[-1])
                nn.init.uniform_(weight_a, -bound, bound)
            nn.init.zeros_(self.lora_B[adapter_name][name])

    def forward(self, hidden_states: torch.Tensor, dispatch, adapter_names=None) -> torch.Tensor:
        """`SwitchExperts.forward` with the active adapters' low-rank products added to each expert product."""
        if adapter_names is not None:
            raise ValueError(
                f"adapter_names={adapter_names!r}: batches that mix adapters are not supported on Switch experts; "
                "use set_adapter."
            )
        if self.disable_adapters and self.merged:
            self.unmerge()
        adapters = [name for name in self.active_adapters if name in self.lora_A]
        if self.disable_adapters or self.merged or not adapters:
            return self.base_layer(hidden_states, dispatch)

        def low_rank_update(rows, name, product):
            # In the rows' dtype, as the expert products run (the kernels take one dtype; under autocast, its dtype):
            # the casts carry the gradients back to the adapters' own dtype.
            update = None
            for adapter in adapters:
                weight_a, weight_b = (factor[adapter][name].to(rows.dtype) for factor in (self.lora_A, self.lora_B))
                inner = product(self.lora_dropout[adapter](rows), weight_a, self._memory(adapter, "A", name))
                term = product(inner, weight_b, self._memory(adapter, "B", name)) * self.scaling[adapter]
                update = term if update is None else update + term
            return update

        return self.base_layer(hidden_states, dispatch, low_rank_update=low_rank_update)

    def forward_pairs(self, implementation: str, *args, **kwargs):
        raise ValueError(
            f"experts_implementation={implementation!r} runs transformers' kernels, which cannot apply LoRA adapters "
            "on the experts; use 'eager' (set_experts_implementation('eager')) or merge the adapters first."
        )

    def _memory(self, adapter: str, factor: str, name: str) -> GradientMemory:
        return self.gradient_memory.setdefault((adapter, factor, name), GradientMemory())

    def get_delta_weight(self, adapter: str) -> dict[str, torch.Tensor]:
        """`{name: s * B @ A}`, each `[E_local, out, in]` like the weight it updates."""
        return {
            name: torch.bmm(self.lora_B[adapter][name], weight_a) * self.scaling[adapter]
            for name, weight_a in self.lora_A[adapter].items()
        }

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        weights = self.stacked_weights()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            for name, delta in self.get_delta_weight(adapter).items():
                merged = weights[name].data + delta.to(weights[name].dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"Merging adapter {adapter!r} into {name} gives non-finite weights.")
                # In place: FSDP2 keeps the storage of the parameters it shards, and gathers from it when saving.
                weights[name].data.copy_(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        weights = self.stacked_weights()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            for name, delta in self.get_delta_weight(adapter).items():
                weights[name].data -= delta.to(weights[name].dtype)

    def train(self, mode: bool = True):
        if not mode:  # as `SwitchExperts.train`: no backward passes ahead
            self.gradient_memory.clear()
        return super().train(mode)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
