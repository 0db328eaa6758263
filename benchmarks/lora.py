"""LoRA training steps against full finetuning, on a model with every layer sparse.

Variants, each a full training step (forward, backward, fused AdamW over the trainable parameters) of the same model
and batch: every parameter trainable ("full"), LoRA on attention only, LoRA on attention and experts through
hf_switch's expert LoRA layer (adapters on the routed rows), and the same adapters through peft's
`target_parameters` path (`W + B @ A` formed for every expert on every forward), which hf_switch used before.

    python -m benchmarks.lora '<json>'   # peak memory of one variant alone in a fresh process (see benchmarks.memory)
"""

import json
import sys
from dataclasses import asdict

import torch
from peft import LoraConfig, get_peft_model

from hf_switch.lora import ATTENTION, lora_config

from . import device
from .model import ModelCase, batch, build_model, train_step
from .timing import compare

VARIANTS = ("lora attention", "lora attention+experts", "lora attention+experts (peft target_parameters)", "full")


def lora_cases(quick: bool) -> list[ModelCase]:
    """d_model 256, d_ff 1024, 2+2 layers, every layer sparse, batch 8 x 128 source / 64 target tokens."""
    experts = (8, 32) if quick else (8, 64, 128)
    return [ModelCase(256, 1024, 2, 4, e, True, 8192, 8 if not quick else 4, 128, 64) for e in experts]


def build_variant(case: ModelCase, variant: str) -> torch.nn.Module:
    model = build_model(case, "hf_switch")
    if variant == "full":
        return model
    if variant == "lora attention+experts (peft target_parameters)":
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION, target_parameters=["experts.wi", "experts.wo"])
    else:
        lora = lora_config(variant.removeprefix("lora "), model.config, r=8, alpha=16)
    return get_peft_model(model, lora)


def measure(case: ModelCase, rounds: int) -> dict:
    """`{variant: {"median_s", "ratio"}}`, ratios to the attention-only LoRA step."""
    inputs = batch(case)
    steps = {variant: train_step(build_variant(case, variant), inputs) for variant in VARIANTS}
    return compare(steps, "lora attention", rounds)


def peak_memory(spec: dict) -> dict:
    """Peak resident memory (MiB) of `spec["steps"]` training steps of one variant, above the built model's."""
    torch.set_num_threads(2)
    device.use(spec["device"], spec["dtype"])
    case = ModelCase(**spec["case"])
    model = build_variant(case, spec["variant"])
    built, peak = device.step_memory_mib(train_step(model, batch(case)), spec["steps"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"steps_mib": peak - built, "trainable_parameters": trainable}


def memory_spec(case: ModelCase, variant: str) -> str:
    """The spec of a fresh process measuring `variant`, on the device and dtype of this one."""
    return json.dumps({"case": asdict(case), "variant": variant, "steps": 2, **device.defaults()})


if __name__ == "__main__":
    print(json.dumps(peak_memory(json.loads(sys.argv[1]))))
