"""Whole models: a training step (forward, backward, AdamW) and greedy generation with a cache.

hf_switch's model, transformers' `SwitchTransformersForConditionalGeneration` holding the same weights (written by
`hf_switch.save_as_switch_transformers`, read by `from_pretrained`), and `T5ForConditionalGeneration` of the same
dense dimensions. The capacity is absolute (`expert_capacity`), which both Switch implementations share.
"""

import math
import tempfile
from dataclasses import dataclass

import torch
from transformers import SwitchTransformersForConditionalGeneration, T5Config, T5ForConditionalGeneration

import hf_switch

from . import device
from .timing import compare


@dataclass
class ModelCase:
    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_experts: int
    every_layer_sparse: bool
    vocab_size: int
    batch: int
    source_length: int
    target_length: int
    capacity_factor: float = 1.25

    @property
    def name(self) -> str:
        sparse = "all-sparse" if self.every_layer_sparse else "half-sparse"
        return f"E{self.num_experts}-{sparse}-d{self.d_model}"

    def shared_fields(self) -> dict:
        return dict(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            d_kv=self.d_model // self.num_heads,
            d_ff=self.d_ff,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            dropout_rate=0.0,
            feed_forward_proj="relu",
            decoder_start_token_id=0,
        )


def switch_config(case: ModelCase) -> hf_switch.SwitchConfig:
    sparse_layers = case.num_layers if case.every_layer_sparse else case.num_layers // 2
    return hf_switch.SwitchConfig(
        **case.shared_fields(),
        num_experts=case.num_experts,
        num_sparse_encoder_layers=sparse_layers,
        num_sparse_decoder_layers=sparse_layers,
        expert_capacity=math.ceil(case.capacity_factor * case.source_length / case.num_experts),
        routing_group="sequence",  # transformers' semantics, so that both Switch models route alike
        router_jitter_noise=0.0,
    )


def build_model(case: ModelCase, kind: str, seed: int = 0):
    """`kind`: "hf_switch", "transformers" (transformers' Switch, hf_switch's weights) or "t5"."""
    torch.manual_seed(seed)
    if kind == "t5":
        return T5ForConditionalGeneration(T5Config(**case.shared_fields()))
    ours = hf_switch.SwitchForConditionalGeneration(switch_config(case))
    if kind == "hf_switch":
        return ours
    with tempfile.TemporaryDirectory() as folder:
        hf_switch.save_as_switch_transformers(ours, folder)
        loaded = SwitchTransformersForConditionalGeneration.from_pretrained(folder, dtype=torch.get_default_dtype())
        return loaded.to(torch.get_default_device())


def batch(case: ModelCase, seed: int = 1) -> dict:
    generator = device.generator(seed)
    return {
        "input_ids": torch.randint(2, case.vocab_size, (case.batch, case.source_length), generator=generator),
        "labels": torch.randint(2, case.vocab_size, (case.batch, case.target_length), generator=generator),
    }


def train_step(model, inputs):
    """A closure running one training step: forward, backward, AdamW, zero_grad.

    AdamW is the fused kernel, the `Trainer`'s default on torch >= 2.8. Its learning rate is 0: the step does all of
    its work, but the weights, and so every model's routing, stay as built, and each model is timed on the routing it
    starts from. With a real learning rate the routings drift apart over the rounds: transformers' model (whose loss
    leaves out the router losses unless `output_router_logits=True`) collapsed onto a few experts within ten steps on
    the repeated batch and dropped up to 80 % of a layer's tokens, doing less expert work per step. transformers'
    Switch also gets `output_router_logits=True`, so that both Switch models compute their router losses.
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    if isinstance(model, SwitchTransformersForConditionalGeneration):
        inputs = {**inputs, "output_router_logits": True}

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def generate_step(model, inputs, new_tokens: int):
    """A closure decoding `new_tokens` tokens greedily with a KV cache (end-of-sequence suppressed)."""
    model.eval()

    def step():
        with torch.no_grad():
            model.generate(
                inputs["input_ids"],
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
            )

    return step


def measure_training(case: ModelCase, kinds: list[str], rounds: int) -> dict:
    inputs = batch(case)
    return compare({kind: train_step(build_model(case, kind), inputs) for kind in kinds}, kinds[-1], rounds)


def measure_generation(case: ModelCase, kinds: list[str], rounds: int, new_tokens: int) -> dict:
    inputs = batch(case)
    steps = {kind: generate_step(build_model(case, kind), inputs, new_tokens) for kind in kinds}
    return compare(steps, kinds[-1], rounds, warmup=1)
