"""LoRA finetuning with peft, experts included, and checks against the known silent failure.

peft adapts the stacked expert weights (`experts.wi`, `experts.wo`, `[E, out, in]`) through
`LoraConfig(target_parameters=...)` and the attention and dense projections through `target_modules`. The known
failure of LoRA on MoE models is that the experts are silently left out; `apply_lora` checks after wrapping that
every targeted name matched and every sparse layer carries expert adapters, and `ExpertLoraGradientCheck` checks
on the first optimizer step that those adapters receive gradients.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import TrainerCallback

from .configuration_switch import SwitchConfig
from .experts import SwitchExperts

ATTENTION = ["q", "k", "v", "o"]
DENSE_FEED_FORWARD = ["wi", "wi_0", "wi_1", "wo"]
LORA_PRESETS = ("attention", "attention+experts", "all-linear")


def _expert_parameter_names(config: SwitchConfig) -> list[str]:
    inner = ["experts.wi_0", "experts.wi_1"] if config.is_gated_act else ["experts.wi"]
    return [*inner, "experts.wo"]


def _dense_feed_forward_names(config: SwitchConfig) -> list[str]:
    return ["wi_0", "wi_1", "wo"] if config.is_gated_act else ["wi", "wo"]


def lora_config(
    preset: str,
    config: SwitchConfig,
    r: int = 8,
    alpha: int = 16,
    train_router: bool = False,
) -> LoraConfig:
    """A `peft.LoraConfig` for a Switch model.

    Args:
        preset: "attention" (q, k, v, o), "attention+experts" (adds the stacked expert weights), or "all-linear"
            (attention, dense feed-forward layers and experts; never the router or the LM head).
        config: the model's config (gated experts have `wi_0`/`wi_1` instead of `wi`).
        r, alpha: LoRA rank and scaling numerator.
        train_router: also train the routers (as full copies through `modules_to_save`); frozen by default.

    LoRA dropout stays 0: peft cannot apply dropout to adapted parameters (`target_parameters`).
    """
    if preset not in LORA_PRESETS:
        raise ValueError(f"lora preset={preset!r}: choose one of {LORA_PRESETS}.")
    if r < 1:
        raise ValueError(f"lora r={r}: must be a positive integer.")
    target_modules = list(ATTENTION)
    if preset == "all-linear":
        target_modules += _dense_feed_forward_names(config)
    target_parameters = [] if preset == "attention" else _expert_parameter_names(config)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=target_modules,
        target_parameters=target_parameters or None,
        modules_to_save=["router"] if train_router else None,
        task_type="SEQ_2_SEQ_LM",
    )


def _adapted_module_names(model: nn.Module) -> set[str]:
    """Last name component of every module that peft wrapped with a LoRA `Linear` adapter."""
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and getattr(module, "parameter_name", None) is None
    }


def expert_adapters(model: nn.Module) -> dict[str, list[str]]:
    """For each `SwitchExperts` module, the names of its parameters that carry a LoRA adapter.

    peft wraps the experts module in one `ParamWrapper` per adapted parameter, nested, so the wrappers are the
    experts module's ancestors.
    """
    wrappers = [
        (name, module.parameter_name)
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and getattr(module, "parameter_name", None) is not None
    ]
    return {
        name.replace(".base_layer", ""): [
            parameter for wrapper, parameter in wrappers if name.startswith(wrapper + ".")
        ]
        for name, module in model.named_modules()
        if isinstance(module, SwitchExperts)
    }


def apply_lora(model: nn.Module, lora: LoraConfig) -> PeftModel:
    """`get_peft_model`, then refuse targets that matched nothing and sparse layers left without expert adapters."""
    expert_parallel_size = getattr(model.config, "expert_parallel_size", 1)
    if expert_parallel_size > 1:
        # peft wraps the experts module, which then no longer is the DeepSpeed MoE layer its engine must recognise.
        raise ValueError(
            f"SwitchConfig.expert_parallel_size={expert_parallel_size}: LoRA finetuning runs with every rank holding "
            "every expert (expert_parallel_size=1); adapters are small enough for plain data parallelism."
        )
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    peft_model = get_peft_model(model, lora)
    adapted = _adapted_module_names(peft_model)
    for name in sorted(lora.target_modules or []):
        if name not in adapted and (name in present or name not in DENSE_FEED_FORWARD):
            raise ValueError(f"LoRA target module {name!r} matched no module of the model.")
    expected = {name.rsplit(".", 1)[-1] for name in lora.target_parameters or []}
    for owner, parameters in expert_adapters(peft_model).items():
        missing = expected - set(parameters)
        if missing:
            raise ValueError(
                f"LoRA left the experts of {owner} without adapters for {sorted(missing)}: the expert weights must "
                "be read as attributes of the experts module inside its own forward."
            )
    return peft_model


class ExpertLoraGradientCheck(TrainerCallback):
    """On the first optimizer step, raise unless every expert LoRA adapter received a gradient.

    At initialisation LoRA's B is zero, so only B's gradient can be non-zero on the first step; that is what is
    checked, for each adapted expert parameter of each sparse layer.
    """

    def __init__(self):
        self.checked = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.checked:
            return
        self.checked = True
        for name, module in model.named_modules():
            if getattr(module, "parameter_name", None) is None or not hasattr(module, "lora_B"):
                continue
            gradients = [adapter.weight.grad for adapter in module.lora_B.values()]
            if all(gradient is None or not gradient.any() for gradient in gradients):
                raise RuntimeError(
                    f"The LoRA adapter of {name.replace('.base_layer', '')}.{module.parameter_name} received no "
                    "gradient on the first step: it is not part of the computation (a silent no-op)."
                )


@dataclass
class LoraArguments:
    """LoRA options of `hf-switch finetune`, beside the training arguments."""

    _argument_group_name = "LoRA"

    lora_preset: str = field(default="attention+experts", metadata={"help": f"one of {LORA_PRESETS}"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
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
            lora_args.lora_preset, model.config, lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_train_router
        )
        return apply_lora(model, adapters)

    trainer, metrics = run(
        model_args, data_args, training_args, prepare_model=wrap, callbacks=[ExpertLoraGradientCheck()]
    )
    merged_dir = Path(training_args.output_dir) / "merged"
    if lora_args.merge and trainer.is_world_process_zero():
        trainer.model.merge_and_unload().save_pretrained(merged_dir)
        trainer.processing_class.save_pretrained(merged_dir)
    end_training(trainer)
    if trainer.is_world_process_zero():
        folder, base = training_args.output_dir, model_args.model_name_or_path or "BASE_MODEL"
        load = [
            "import hf_switch",
            "from peft import PeftModel",
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
            f'model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained("{base}"), "{folder}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
        ]
        if lora_args.merge:
            load.append(f'# or the merged model: AutoModelForSeq2SeqLM.from_pretrained("{merged_dir}")')
        next_steps = [f"hf-switch publish {folder} --repo-id ORG/NAME --base-model {base} --dry-run --local-dir PUB"]
        print(closing_summary("finetune", trainer, metrics, load, next_steps))
    return metrics
