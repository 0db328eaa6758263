"""Expert parallelism over DeepSpeed-MoE's process groups.

With `expert_parallel_size = p`, the ranks form expert-parallel groups of `p` consecutive ranks (DeepSpeed's
`ep_size_{p}` groups); rank `r` of a group holds experts `r * E/p ... (r + 1) * E/p - 1` of every sparse layer.
Each rank routes its own tokens, sends every token to the rank of its expert by an all-to-all, and receives the
outputs back by the reverse all-to-all. Non-expert weights stay replicated and data parallel.

The DeepSpeed engine recognises the expert modules (`ExpertParallelExperts` is a `deepspeed.moe.layer.MoE`), so
expert gradients are reduced only within the expert-data-parallel group, ZeRO 1/2 partitions them in their own
optimizer groups, and `save_checkpoint` writes one file per expert (loadable under another expert-parallel size).

Imported only when expert parallelism is used: it needs `deepspeed` (`pip install --no-build-isolation deepspeed`).
Shapes: `M` (token, expert) pairs on this rank, `R` pairs received from the group, `d` d_model, `E` experts, `p`
the expert-parallel size, `E_local = E / p`.
"""

import re
from functools import partial
from pathlib import Path

import torch

try:
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from deepspeed.utils import groups
except ImportError as error:  # this file also travels with remote code, to machines that may lack deepspeed
    raise ImportError(
        "SwitchConfig.expert_parallel_size > 1 needs deepspeed: pip install --no-build-isolation deepspeed"
    ) from error

from .configuration_switch import SwitchConfig
from .experts import Dispatch, SwitchExperts, combine

# How DeepSpeed's engine names an expert's weights in its per-expert checkpoint files.
DEEPSPEED_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
_DEEPSPEED_EXPERT_KEY = r"(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)"
_STACKED_EXPERT_NAMES = ("wi", "wi_0", "wi_1", "wo")


def expert_parallel_group(expert_parallel_size: int) -> str:
    """Name of DeepSpeed's expert-parallel groups of this size, created on first use.

    Raises when no process group is initialised or the world size is not a multiple of the size. A process group
    that torch.distributed started (torchrun, `accelerate launch`) is handed to `deepspeed.comm` as is.
    """
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            f"SwitchConfig.expert_parallel_size={expert_parallel_size} needs an initialised process group: start the "
            "processes with torchrun, the deepspeed launcher or `accelerate launch`, and call "
            "deepspeed.init_distributed(dist_backend='gloo' or 'nccl') before building the model. Use "
            "expert_parallel_size=1 in a single process."
        )
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
    world_size = dist.get_world_size()
    if world_size % expert_parallel_size:
        raise ValueError(
            f"SwitchConfig.expert_parallel_size={expert_parallel_size} does not divide the world size {world_size}: "
            f"it must be a divisor of {world_size} (the ranks form groups of expert_parallel_size)."
        )
    name = f"ep_size_{expert_parallel_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(expert_parallel_size)
    return name


class AllToAll(torch.autograd.Function):
    """Send consecutive row blocks of `input` to the ranks of `group`, block `i` (`send_sizes[i]` rows) to rank `i`;
    returns the rows received, `recv_sizes[i]` from rank `i`, in rank order. The gradient travels back the same way.

    DeepSpeed's own `_AllToAll` moves equal blocks (every expert padded to its capacity); this one moves exactly the
    routed tokens, which dropless routing and per-position decoder capacity need.
    """

    @staticmethod
    def forward(ctx, input, send_sizes: list[int], recv_sizes: list[int], group):
        ctx.sizes, ctx.group = (send_sizes, recv_sizes), group
        output = input.new_empty(sum(recv_sizes), *input.shape[1:])
        dist.all_to_all_single(output, input.contiguous(), recv_sizes, send_sizes, group=group)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        send_sizes, recv_sizes = ctx.sizes
        return AllToAll.apply(grad_output, recv_sizes, send_sizes, ctx.group), None, None, None


class ExpertParallelExperts(MoE, SwitchExperts):
    """This rank's `E_local` experts of a sparse layer, reached by all-to-all from every rank of its group.

    A drop-in for `SwitchExperts` (same parameter names, `[E_local, out, in]`; same `forward` contract over all `E`
    experts). It is a `deepspeed.moe.layer.MoE` only so that DeepSpeed's engine treats it as one: `MoE.__init__`
    (which would build DeepSpeed's own gate and experts) is not run, and the attributes the engine reads are set here.
    """

    def __init__(self, config: SwitchConfig):
        ep_size = config.expert_parallel_size
        if config.num_experts % ep_size:
            raise ValueError(
                f"SwitchConfig.expert_parallel_size={ep_size} does not divide num_experts={config.num_experts}: it "
                f"must be a divisor of {config.num_experts}, so that every rank holds as many experts."
            )
        group_name = expert_parallel_group(ep_size)
        SwitchExperts.__init__(self, config, num_local_experts=config.num_experts // ep_size)
        self.ep_size, self.expert_group_name = ep_size, group_name
        self.group = groups._get_expert_parallel_group(self.expert_group_name)
        self.first_expert = groups._get_expert_parallel_rank(self.expert_group_name) * self.num_local_experts
        self.mark_expert_parameters()
        self._holds_adapters = False
        self.register_state_dict_post_hook(_name_experts_as_deepspeed)
        self.register_load_state_dict_pre_hook(_stack_deepspeed_experts)

    def mark_expert_parameters(self, parameters=None) -> None:
        """Mark the weights (or `parameters` that belong to this rank's experts, such as their LoRA factors) as
        DeepSpeed marks expert weights: reduced within the expert-data-parallel group only.

        Loading may replace parameter objects (transformers assigns loaded tensors), so this runs again after it.
        """
        for parameter in self.parameters() if parameters is None else parameters:
            parameter.allreduce = False
            parameter.group_name = self.expert_group_name

    def hold_adapters(self, lora_layer: torch.nn.Module) -> None:
        """Keep the LoRA factors of `lora_layer` (the peft layer wrapping this module; each factor `[E_local, ...]`)
        with this rank's experts: reduced as expert weights, and written into and read back from DeepSpeed's
        per-expert checkpoint files beside the expert weights (the engine's other file holds rank 0's factors only).
        """
        if not self._holds_adapters:
            self._holds_adapters = True
            self.register_state_dict_post_hook(partial(_name_adapters_as_deepspeed, lora_layer))
            lora_layer.register_load_state_dict_pre_hook(_stack_deepspeed_adapters)
        self.mark_expert_parameters(list(_adapter_factors(lora_layer).values()))

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        # The engine calls this on every MoE layer; the groups exist since __init__ (they decide the held experts).
        if use_data_before_expert_parallel_:
            raise ValueError(
                "DeepSpeed config use_data_before_expert_parallel_=true is not supported by hf_switch's expert "
                "parallelism: the expert-parallel groups are consecutive ranks. Remove it from the config."
            )

    def forward(self, hidden_states: torch.Tensor, dispatch: Dispatch, low_rank_update=None) -> torch.Tensor:
        """Send each pair's token to the rank holding its expert, run the held experts, combine what comes back.

        Args:
            hidden_states: `[N, d]` this rank's tokens.
            dispatch: this rank's pairs, grouped by (global) expert (`tokens_per_expert` has `E` entries).
            low_rank_update: as in `SwitchExperts.forward`, for the held experts (their LoRA adapters).

        Returns:
            `[N, d]`; zeros for tokens that no pair names.
        """
        ranks, local = self.ep_size, self.num_local_experts
        tokens_per_expert = dispatch.tokens_per_expert
        received_counts = torch.empty_like(tokens_per_expert)
        dist.all_to_all_single(received_counts, tokens_per_expert, group=self.group)
        received_counts = received_counts.view(ranks, local)  # [source rank, held expert]
        send_sizes = tokens_per_expert.view(ranks, local).sum(dim=1).tolist()
        recv_sizes = received_counts.sum(dim=1).tolist()
        sent = hidden_states.index_select(0, dispatch.token_ids)
        received = AllToAll.apply(sent, send_sizes, recv_sizes, self.group)

        # Rows arrive by source rank, then expert; the held experts take them by expert, then source rank, and
        # return them in arrival order.
        held_expert = torch.arange(local, device=received.device).repeat(ranks)
        by_expert = torch.argsort(held_expert.repeat_interleave(received_counts.flatten()), stable=True)
        arrivals = Dispatch(token_ids=by_expert, weights=None, tokens_per_expert=received_counts.sum(dim=0))
        outputs = SwitchExperts.forward(self, received, arrivals, low_rank_update=low_rank_update)
        returned = AllToAll.apply(outputs, recv_sizes, send_sizes, self.group)
        return combine(returned, dispatch.token_ids, dispatch.weights, hidden_states.shape[0])


def _name_experts_as_deepspeed(module: ExpertParallelExperts, state_dict, prefix: str, local_metadata) -> None:
    """Give the module's own `state_dict()` DeepSpeed's per-expert names (`deepspeed_experts.{local id}.wi`).

    DeepSpeed's engine writes each expert's file from the MoE module's own state dict, expects those names, and
    renumbers them to global ids in the files. A state dict of the whole model (non-empty `prefix`) keeps the stacked
    names that `save_pretrained` writes.
    """
    if prefix:
        return
    for name in _STACKED_EXPERT_NAMES:
        if name in state_dict:
            for local_id, weight in enumerate(state_dict.pop(name)):
                state_dict[f"{DEEPSPEED_EXPERT_PREFIX}{local_id}.{name}"] = weight


def _stack_deepspeed_experts(module: ExpertParallelExperts, state_dict, prefix: str, *args) -> None:
    """Stack DeepSpeed's per-expert entries (`{prefix}deepspeed_moe...deepspeed_experts.{local id}.wi`, as its
    `load_checkpoint` hands them over) into this module's `[E_local, ...]` weights before loading."""
    for name in _STACKED_EXPERT_NAMES:
        _stack_entries(state_dict, f"{prefix}{DEEPSPEED_EXPERT_PREFIX}", name, module.num_local_experts, prefix)


def _adapter_factors(lora_layer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA factors of an expert LoRA layer by their names in it (`lora_A.<adapter>.wo`)."""
    return {name: factor for name, factor in lora_layer.named_parameters() if name.startswith("lora_")}


def _name_adapters_as_deepspeed(lora_layer, module: ExpertParallelExperts, state_dict, prefix: str, *args) -> None:
    """Add the held experts' LoRA factors to the module's own `state_dict()` under DeepSpeed's per-expert names
    (`deepspeed_experts.{local id}.lora_A.<adapter>.wo`), so that the engine writes them into each expert's file."""
    if prefix:
        return
    for name, factor in _adapter_factors(lora_layer).items():
        for local_id, expert_factor in enumerate(factor.detach()):
            state_dict[f"{DEEPSPEED_EXPERT_PREFIX}{local_id}.{name}"] = expert_factor


def _stack_deepspeed_adapters(lora_layer, state_dict, prefix: str, *args) -> None:
    """Stack the per-expert LoRA factors of a DeepSpeed checkpoint into the LoRA layer's `[E_local, ...]` factors
    before loading, in place of the engine's other file's entries (rank 0's factors)."""
    experts = lora_layer.get_base_layer()
    for name in _adapter_factors(lora_layer):
        _stack_entries(
            state_dict, f"{prefix}base_layer.{DEEPSPEED_EXPERT_PREFIX}", name, experts.num_local_experts, prefix
        )


def _stack_entries(state_dict: dict, expert_prefix: str, name: str, count: int, prefix: str) -> None:
    """`state_dict[prefix + name]` = the stacked `{expert_prefix}{local id}.{name}` entries, removed, if all exist."""
    keys = [f"{expert_prefix}{local_id}.{name}" for local_id in range(count)]
    if all(key in state_dict for key in keys):
        state_dict[f"{prefix}{name}"] = torch.stack([state_dict.pop(key) for key in keys])


def local_expert_state_dict(model: torch.nn.Module, checkpoint_files: list[str]) -> dict:
    """The weights of `checkpoint_files` that this rank's model holds, read lazily from safetensors files.

    Stacked expert weights (`...mlp.experts.wi`, `[E, ...]`) are read for this rank's experts only; transformers'
    per-expert layout (`...mlp.experts.expert_{e}.wi.weight`) keeps this rank's experts, renumbered from 0, for the
    registered conversion to stack. Other weights are returned as lazy safetensors slices, as transformers reads them.
    """
    from safetensors import safe_open

    held = {
        f"{name}.": (module.first_expert, module.num_local_experts)
        for name, module in model.named_modules()
        if isinstance(module, ExpertParallelExperts)
    }
    state_dict = {}
    for file in checkpoint_files:
        if not file.endswith(".safetensors"):
            raise ValueError(
                f"{file}: expert-parallel loading reads safetensors files (this rank's experts only); convert the "
                "checkpoint first: `hf-switch convert SOURCE DESTINATION --to hf_switch`."
            )
        handle = safe_open(file, framework="pt", device="cpu")
        for key in handle.keys():
            module_prefix, _, name = key.rpartition("experts.")
            experts_prefix = f"{module_prefix}experts."
            if experts_prefix not in held:
                state_dict[key] = handle.get_slice(key)
                continue
            first, count = held[experts_prefix]
            if name in _STACKED_EXPERT_NAMES:
                state_dict[key] = handle.get_slice(key)[first : first + count]
            elif (match := re.fullmatch(r"expert_(\d+)\.(.+)", name)) and first <= int(match[1]) < first + count:
                state_dict[f"{experts_prefix}expert_{int(match[1]) - first}.{match[2]}"] = handle.get_tensor(key)
    return state_dict


def consolidated_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's state dict with every expert, gathered from the expert-parallel group (all ranks call it).

    The experts' LoRA factors (`...experts.lora_A.<adapter>.wo`, `[E_local, r, d]`, on a peft model) are gathered
    with them, so a `PeftModel.save_pretrained(..., state_dict=...)` of it holds every expert's adapter.
    """
    state_dict = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            keys, experts = [f"{name}.{weight_name}" for weight_name in _STACKED_EXPERT_NAMES], module
        elif isinstance(getattr(module, "base_layer", None), ExpertParallelExperts):  # an expert LoRA layer
            keys, experts = [f"{name}.{factor}" for factor in _adapter_factors(module)], module.base_layer
        else:
            continue
        for key in keys:
            if key in state_dict:
                local = state_dict[key].detach().contiguous()
                pieces = [torch.empty_like(local) for _ in range(experts.ep_size)]
                dist.all_gather(pieces, local, group=experts.group)
                state_dict[key] = torch.cat(pieces)
    return state_dict


def moe_optimizer_groups(param_groups: list[dict]) -> list[dict]:
    """Optimizer parameter groups with the expert weights in groups of their own, marked as DeepSpeed MoE groups.

    DeepSpeed's ZeRO 1/2 refuse an optimizer whose groups do not separate expert weights (it reduces and partitions
    them over the expert-data-parallel group); DeepSpeed's own optimizers do this themselves.
    """
    named = [{**group, "name": group.get("name", f"group_{index}")} for index, group in enumerate(param_groups)]
    return [group for group in split_params_into_different_moe_groups_for_optimizer(named) if group["params"]]


def check_deepspeed_config(deepspeed_config: dict | None) -> None:
    """Refuse to train expert-parallel layers without DeepSpeed, or under a DeepSpeed config that cannot, naming the
    setting and what to use instead."""
    if deepspeed_config is None:
        raise ValueError(
            "expert_parallel_size > 1 trains under DeepSpeed only: pass --deepspeed configs/deepspeed/zero2_moe.json "
            "or launch with an accelerate DeepSpeed config (configs/accelerate/). Under plain data parallelism the "
            "ranks would average the gradients of different experts."
        )
    stage = deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise ValueError(
            "DeepSpeed zero_optimization.stage=3 with expert_parallel_size > 1: DeepSpeed's native MoE layers do not "
            "support ZeRO-3 (its engine refuses them). Use stage 0, 1 or 2 (configs/deepspeed/zero2_moe.json), which "
            "shard optimizer state and gradients while experts are sharded by expert parallelism; or train with "
            "expert_parallel_size=1 under ZeRO-3."
        )


def deepspeed_checkpoint_state_dict(checkpoint_dir: str | Path, tag: str | None = None) -> dict:
    """A `save_pretrained`-style state dict (stacked experts) from a DeepSpeed checkpoint of any expert-parallel size.

    Reads the model states (`mp_rank_00_model_states.pt`, without experts) and every per-expert file
    (`layer_*_expert_*_mp_rank_00_model_states.pt`) of `checkpoint_dir/tag` (`tag` defaults to the `latest` file's).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if tag is None:
        latest = checkpoint_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{checkpoint_dir}: no 'latest' file naming a DeepSpeed checkpoint tag; pass tag=.")
        tag = latest.read_text().strip()
    folder = checkpoint_dir / tag
    model_states = folder / "mp_rank_00_model_states.pt"
    if not model_states.is_file():
        raise FileNotFoundError(f"{folder}: no mp_rank_00_model_states.pt; is this a DeepSpeed checkpoint folder?")
    # DeepSpeed pickles its config and counters next to the weights: these are trusted local files.
    state_dict = dict(torch.load(model_states, map_location="cpu", weights_only=False)["module"])
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for expert_file in sorted(folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        for key, tensor in torch.load(expert_file, map_location="cpu", weights_only=True).items():
            match = re.fullmatch(_DEEPSPEED_EXPERT_KEY, key)
            if match is None:
                raise ValueError(f"{expert_file}: {key} is not a DeepSpeed expert weight name.")
            experts.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = tensor
    for key, by_expert in experts.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            missing = sorted(set(range(max(by_expert) + 1)) - set(by_expert))
            raise ValueError(f"{folder}: the per-expert files of {key} lack experts {missing}.")
        state_dict[key] = torch.stack([by_expert[expert] for expert in range(len(by_expert))])
    return state_dict


def load_deepspeed_checkpoint(checkpoint_dir: str | Path, config_source: str | Path | None = None, tag=None):
    """A single-process `SwitchForConditionalGeneration` with the weights of a DeepSpeed checkpoint.

    Args:
        checkpoint_dir: the folder `engine.save_checkpoint` wrote (a Trainer checkpoint folder under DeepSpeed).
        config_source: a folder or file with the model's config.json; default `checkpoint_dir` (the Trainer saves
            one there).
        tag: the checkpoint tag (`global_step100`); default: the one the `latest` file names.
    """
    from .modeling_switch import SwitchForConditionalGeneration

    config = SwitchConfig.from_pretrained(config_source or checkpoint_dir)
    config.expert_parallel_size = 1
    model = SwitchForConditionalGeneration(config)
    model.load_state_dict(deepspeed_checkpoint_state_dict(checkpoint_dir, tag), strict=True)
    return model.eval()
