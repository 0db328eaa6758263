"""LoRA finetuning with peft, experts included, and checks against the known silent failure.

Attention and dense projections get peft's own `nn.Linear` adapters (`target_modules`). The experts module of each
sparse layer gets `expert_lora.SwitchExpertsLora`, registered with peft as a custom LoRA layer
(`LoraConfig._register_custom_module`): each expert's adapter runs on the rows routed to it. peft does not save that
registration with the adapter, so an adapter with expert LoRA loads with `load_adapter` here (or with
`PeftModel.from_pretrained(model, folder, config=register_expert_lora(LoraConfig.from_pretrained(folder)))`).
Adapters saved by hf_switch before it, through peft's `target_parameters` (`ParamWrapper`), are converted on load.

The known failure of LoRA on MoE models is that the experts are silently left out; `apply_lora` checks after
wrapping that every targeted name matched and every sparse layer carries expert adapters, and
`ExpertLoraGradientCheck` checks in the first optimizer step that those adapters receive gradients.
"""

import logging
import sys
import tempfile
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from .configuration_switch import SwitchConfig
from .expert_lora import SwitchExpertsLora
from .experts import SwitchExperts

logger = logging.getLogger(__name__)

ATTENTION = ["q", "k", "v", "o"]
DENSE_FEED_FORWARD = ["wi", "wi_0", "wi_1", "wo"]
EXPERTS = "experts"
LORA_PRESETS = ("attention", "attention+experts", "all-linear")


def _dense_feed_forward_names(config: SwitchConfig) -> list[str]:
    return ["wi_0", "wi_1", "wo"] if config.is_gated_act else ["wi", "wo"]


def register_expert_lora(lora: LoraConfig) -> LoraConfig:
    """Map `SwitchExperts` to hf_switch's expert LoRA layer in `lora` (in place; returned for chaining)."""
    lora._register_custom_module({SwitchExperts: SwitchExpertsLora})
    return lora


def lora_config(
    preset: str,
    config: SwitchConfig,
    r: int = 8,
    alpha: int = 16,
    train_router: bool = False,
    dropout: float = 0.0,
) -> LoraConfig:
    """A `peft.LoraConfig` for a Switch model, with the expert LoRA layer registered.

    Args:
        preset: "attention" (q, k, v, o), "attention+experts" (adds every stacked expert weight), or "all-linear"
            (attention, dense feed-forward layers and experts; never the router or the LM head).
        config: the model's config (gated models have `wi_0`/`wi_1` instead of `wi`).
        r, alpha: LoRA rank and scaling numerator.
        train_router: also train the routers (as full copies through `modules_to_save`); frozen by default.
        dropout: LoRA dropout on the input of every adapter, the experts' included.
    """
    if preset not in LORA_PRESETS:
        raise ValueError(f"lora preset={preset!r}: choose one of {LORA_PRESETS}.")
    if r < 1:
        raise ValueError(f"lora r={r}: must be a positive integer.")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora dropout={dropout}: must be in [0, 1).")
    target_modules = list(ATTENTION)
    if preset == "all-linear":
        target_modules += _dense_feed_forward_names(config)
    if preset != "attention":
        target_modules.append(EXPERTS)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=["router"] if train_router else None,
        task_type="SEQ_2_SEQ_LM",
    )
    return register_expert_lora(lora)


def expert_adapters(model: nn.Module) -> dict[str, list[str]]:
    """For each experts module of `model`, the names of its stacked weights that carry a LoRA adapter."""
    adapters = {
        name: sorted({weight for adapter in module.lora_A.values() for weight in adapter})
        for name, module in model.named_modules()
        if isinstance(module, SwitchExpertsLora)
    }
    for name, module in model.named_modules():
        if isinstance(module, SwitchExperts) and not name.endswith(".base_layer"):
            adapters[name] = []
    return adapters


def apply_lora(model: nn.Module, lora: LoraConfig) -> PeftModel:
    """`get_peft_model`, then refuse targets that matched nothing and sparse layers left without expert adapters."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    peft_model = get_peft_model(model, lora)
    adapted = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    for name in sorted(lora.target_modules or []):
        if name not in adapted and (name in present or name not in DENSE_FEED_FORWARD):
            raise ValueError(f"LoRA target module {name!r} matched no module of the model.")
    if EXPERTS in (lora.target_modules or []):
        bare = [owner for owner, weights in expert_adapters(peft_model).items() if not weights]
        if bare:
            raise ValueError(
                f"LoRA left the experts of {bare} without adapters: register the expert LoRA layer on the config "
                "(hf_switch.lora.register_expert_lora)."
            )
    return peft_model


def _from_parameter_adapter(lora: LoraConfig, weights: dict) -> tuple[LoraConfig, dict]:
    """An adapter of peft's `target_parameters` path (nested `ParamWrapper`s on `experts.<weight>`) as one for the
    expert LoRA layer: the same numbers, `lora_A` `[r * E, in]` -> `[E, r, in]`, `lora_B` `[out, r * E]` ->
    `[E, out, r]`, keyed `<experts>.lora_A.<weight>`."""
    targets = [name.removeprefix(f"{EXPERTS}.") for name in lora.target_parameters]
    if not all(name in ("wi", "wi_0", "wi_1", "wo") for name in targets):
        raise ValueError(
            f"adapter target_parameters={lora.target_parameters}: only Switch experts' stacked weights (experts.wi, "
            "experts.wi_0, experts.wi_1, experts.wo) can be converted."
        )
    rank = lora.r
    converted = {}
    for key, tensor in weights.items():
        owner, found, rest = key.partition(f".{EXPERTS}.")
        if not found:
            converted[key] = tensor
            continue
        depth = rest.count("base_layer.")  # the innermost wrapper adapts the first target
        factor = rest.removeprefix("base_layer." * depth).removesuffix(".weight")
        weight = targets[len(targets) - 1 - depth]
        if factor == "lora_A":
            tensor = tensor.reshape(-1, rank, tensor.shape[-1])
        else:
            tensor = tensor.reshape(tensor.shape[0], rank, -1).permute(2, 0, 1).contiguous()
        converted[f"{owner}.{EXPERTS}.{factor}.{weight}"] = tensor
    return replace(lora, target_parameters=None, target_modules=[*lora.target_modules, EXPERTS]), converted


def load_adapter(
    model: nn.Module, adapter: str | Path, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """Load a LoRA adapter folder onto `model` (a base model, or a `PeftModel` that gets `adapter_name` beside its
    adapters), with the expert LoRA layer registered; adapters of peft's `target_parameters` path are converted."""
    lora, weights = LoraConfig.from_pretrained(adapter), None
    if lora.target_parameters:
        lora, weights = _from_parameter_adapter(lora, load_peft_weights(str(adapter), device="cpu"))
        logger.warning(
            "%s holds expert adapters of peft's target_parameters path; converted to hf_switch's expert LoRA layer "
            "(the same numbers). Save it again to keep the converted form.",
            adapter,
        )
    if getattr(model.config, "expert_parallel_size", 1) > 1:
        weights = _this_ranks_experts(model, weights or load_peft_weights(str(adapter), device="cpu"), adapter)
    with tempfile.TemporaryDirectory() as rewritten:
        if weights is not None:
            lora.save_pretrained(rewritten)
            save_file(weights, Path(rewritten) / "adapter_model.safetensors")
            adapter = rewritten
        register_expert_lora(lora)
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, lora)
            model.load_adapter(adapter, adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, adapter, adapter_name, is_trainable=is_trainable, config=lora)


def _this_ranks_experts(model: nn.Module, weights: dict, adapter) -> dict:
    """The adapter `weights` with each expert LoRA factor (`[E, ...]`, every expert's) cut to the experts this rank
    of an expert-parallel model holds."""
    from .expert_parallel import ExpertParallelExperts

    held = next(module for module in model.modules() if isinstance(module, ExpertParallelExperts))
    first, count, total = held.first_expert, held.num_local_experts, model.config.num_experts
    sliced = {}
    for key, tensor in weights.items():
        if f".{EXPERTS}.lora_" in key:
            if tensor.shape[0] != total:
                raise ValueError(
                    f"{adapter}: {key} holds adapters for {tensor.shape[0]} experts, the model has {total}: an "
                    "adapter saved from one rank of an expert-parallel model. Save with SwitchTrainer, or "
                    "PeftModel.save_pretrained(folder, state_dict=hf_switch.expert_parallel.consolidated_state_dict("
                    "model)) called on every rank."
                )
            tensor = tensor[first : first + count].clone()
        sliced[key] = tensor
    return sliced


class ExpertLoraGradientCheck(TrainerCallback):
    """After the first optimizer step, raise unless every expert LoRA adapter received a gradient.

    At initialisation LoRA's B is zero, so only B's gradient can be non-zero on the first step; that is what is
    checked, for each adapted expert parameter of each sparse layer. Hooks see the gradients as the backward pass
    computes them, whichever engine then steps (DeepSpeed's ZeRO moves them out of `.grad` and steps inside
    `backward`, before any callback could look). FSDP2 runs the backward on gathered copies of the parameters, which
    the hooks do not see, and leaves each parameter's share of the reduced gradient in `.grad` before the optimizer
    steps: those are read then, and what any process saw counts for all.
    """

    def __init__(self):
        self.factors: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = []
        self.hooks = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for name, module in model.named_modules():
            if not isinstance(module, SwitchExpertsLora):
                continue
            for adapter in module.active_adapters:
                for weight, factor in module.lora_B[adapter].items():
                    received = torch.zeros((), dtype=bool)
                    self.factors.append((f"adapter {adapter!r} of {name}.{weight}", factor, received))
                    self.hooks.append(factor.register_hook(partial(_record_gradient, received)))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.hooks:  # checked already
            return
        for _, factor, received in self.factors:
            if factor.grad is not None:
                gradient = factor.grad.to_local() if isinstance(factor.grad, DTensor) else factor.grad
                _record_gradient(received, gradient)
        if torch.distributed.is_initialized():
            seen = torch.stack([received for *_, received in self.factors]).to(args.device, torch.uint8)
            torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)
            for (*_, received), seen_anywhere in zip(self.factors, seen.bool().cpu(), strict=True):
                received.logical_or_(seen_anywhere)

    def on_step_end(self, args, state, control, **kwargs):
        for hook in self.hooks:
            hook.remove()
        self.hooks, factors, self.factors = [], self.factors, []
        for adapter, _, gradient_seen in factors:
            if not gradient_seen:
                raise RuntimeError(
                    f"The LoRA {adapter} received no gradient on the first step: it is not part of the computation "
                    "(a silent no-op)."
                )


def _record_gradient(received: torch.Tensor, gradient: torch.Tensor) -> None:
    received.logical_or_(gradient.detach().ne(0).any().cpu())


@dataclass
class LoraArguments:
    """LoRA options of `hf-switch finetune`, beside the training arguments."""

    _argument_group_name = "LoRA"

    lora_preset: str = field(default="attention+experts", metadata={"help": f"one of {LORA_PRESETS}"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the input of every adapter, experts' too"})
    lora_train_router: bool = field(default=False, metadata={"help": "also train the routers (frozen by default)"})
    merge: bool = field(default=False, metadata={"help": "also write the merged plain model to OUTPUT_DIR/merged"})


# The paper finetunes with dropout 0.4 inside the experts and 0.1 elsewhere.
FINETUNE_DEFAULTS = dict(objective="seq2seq", config_overrides="expert_dropout=0.4,dropout_rate=0.1")


def finetune_main(argv: list[str] | None = None) -> dict:
    """`hf-switch finetune`: `hf-switch train` with LoRA adapters; saves the adapter folder (and `--merge`d model)."""
    from .training.train import closing_summary, end_training, parse_arguments, run

    model_args, data_args, training_args, lora_args = parse_arguments(
        sys.argv[1:] if argv is None else argv,
        extra=(LoraArguments,),
        defaults=FINETUNE_DEFAULTS,
        prog="hf-switch finetune",
        examples=(
            "hf-switch finetune --model_name_or_path outputs/hf-switch --train_file pairs.jsonl --output_dir runs/lora "
            "--merge",
        ),
    )

    def wrap(model, datasets, collator):
        adapters = lora_config(
            lora_args.lora_preset,
            model.config,
            lora_args.lora_r,
            lora_args.lora_alpha,
            lora_args.lora_train_router,
            lora_args.lora_dropout,
        )
        return apply_lora(model, adapters)

    trainer, metrics = run(
        model_args, data_args, training_args, prepare_model=wrap, callbacks=[ExpertLoraGradientCheck()]
    )
    merged_dir = Path(training_args.output_dir) / "merged"
    expert_parallel = getattr(trainer.model.config, "expert_parallel_size", 1) > 1
    if lora_args.merge and (expert_parallel or trainer.is_fsdp_enabled or trainer.is_world_process_zero()):
        # Every rank of an expert-parallel or FSDP model merges its share of the adapters; the save gathers them.
        merged = trainer.model.merge_and_unload()
        state_dict = trainer.accelerator.get_state_dict(merged) if trainer.is_fsdp_enabled else None
        merged.save_pretrained(merged_dir, state_dict=state_dict, is_main_process=trainer.is_world_process_zero())
        if trainer.is_world_process_zero():
            trainer.processing_class.save_pretrained(merged_dir)
    end_training(trainer)
    if trainer.is_world_process_zero():
        folder, base = training_args.output_dir, model_args.model_name_or_path or "BASE_MODEL"
        load = [
            "from hf_switch.lora import load_adapter",
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
            f'model = load_adapter(AutoModelForSeq2SeqLM.from_pretrained("{base}"), "{folder}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
        ]
        if lora_args.merge:
            load.append(f'# or the merged model: AutoModelForSeq2SeqLM.from_pretrained("{merged_dir}")')
        next_steps = [
            f"hf-switch predict {folder} SOURCES.txt --references REFERENCES.txt   # the adapter, merged onto {base}",
            f"hf-switch publish {folder} --repo-id ORG/NAME --base-model {base} --dry-run --local-dir PUB",
        ]
        print(closing_summary("finetune", trainer, metrics, load, next_steps))
    return metrics
