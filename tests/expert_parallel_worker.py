"""One rank of the expert-parallel tests (tests/test_expert_parallel.py), started by torchrun on CPU with gloo.

`python -m torch.distributed.run --standalone --nproc_per_node N tests/expert_parallel_worker.py SCENARIO DIR EP
[OPTIONS_JSON]`; each scenario asserts on every rank and rank 0 writes DIR/SCENARIO.json with what it measured.
"""

import json
import sys
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import deepspeed_cpu_entry  # noqa: F401  (skips the shared-memory op build of init_distributed)
import torch
from conftest import one_process_losses, random_batch, tiny_config
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from hf_switch import SwitchForConditionalGeneration, apply_lora, lora_config, save_as_switch_transformers
from hf_switch.expert_parallel import (
    consolidated_state_dict,
    deepspeed_checkpoint_state_dict,
    moe_optimizer_groups,
)
from hf_switch.experts import SwitchExperts
from hf_switch.lora import load_adapter
from hf_switch.routing import end_balancing_step

TOLERANCE = 1e-5


def config(**overrides):
    # Every layer sparse and a binding capacity: routing, dropping and the all-to-all are all exercised. Each rank
    # routes its own batch, so per-sequence routing groups make ranks and one process see the same groups. Expert
    # biases, moved by the engine scenario's steps, travel through its checkpoints and consolidation.
    fields = dict(
        num_experts=4,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
        expert_capacity=3,
        routing_group="sequence",
        router_expert_bias=True,
        router_bias_update_rate=0.05,
    )
    return tiny_config(**{**fields, **overrides})


def reference_folder(directory: Path, name: str = "reference", **overrides) -> Path:
    """A single-process model saved by rank 0, the weights a scenario starts from."""
    folder = directory / name
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        SwitchForConditionalGeneration(config(**overrides)).save_pretrained(folder)
    dist.barrier()
    return folder


def this_ranks_rows(batch: dict) -> dict:
    rows = len(next(iter(batch.values()))) // dist.get_world_size()
    start = dist.get_rank() * rows
    return {key: value[start : start + rows] for key, value in batch.items()}


# Top-1 with a binding absolute capacity; top-2, dropless, gated experts, recomputed in the backward pass.
EQUIVALENCE_CASES = {
    "top1_capacity": ({}, False),
    "top2_dropless_gated_checkpointed": (
        dict(router_top_k=2, expert_capacity=None, capacity_factor=None, feed_forward_proj="gated-gelu"),
        True,
    ),
}


def equivalence(directory: Path, expert_parallel_size: int) -> dict:
    """EP=world on `world` ranks, each with its share of the batch == EP=1 in one process on the whole batch."""
    world = dist.get_world_size()
    assert expert_parallel_size == world
    folders = {name: reference_folder(directory, name, **fields) for name, (fields, _) in EQUIVALENCE_CASES.items()}
    errors = {}
    for wrong_size in (2 * world, 3):  # more ranks than the world has; not a divisor of num_experts=4
        try:
            SwitchForConditionalGeneration.from_pretrained(folders["top1_capacity"], expert_parallel_size=wrong_size)
        except ValueError as error:
            errors[wrong_size] = str(error)
    assert "does not divide the world size" in errors[2 * world], errors
    assert "does not divide num_experts=4" in errors[3], errors
    results = {
        name: _compare_with_one_process(folders[name], checkpointing)
        for name, (_, checkpointing) in EQUIVALENCE_CASES.items()
    }

    # transformers' per-expert layout (google/switch-*) loads this rank's experts too, through the registered
    # conversion.
    transformers_folder = directory / "transformers_layout"
    if dist.get_rank() == 0:
        single = SwitchForConditionalGeneration.from_pretrained(folders["top1_capacity"])
        save_as_switch_transformers(single, transformers_folder)
    dist.barrier()
    batch = this_ranks_rows(random_batch(batch=2 * world, seed=4))
    ours = SwitchForConditionalGeneration.from_pretrained(folders["top1_capacity"], expert_parallel_size=world)
    converted = SwitchForConditionalGeneration.from_pretrained(transformers_folder, expert_parallel_size=world)
    assert torch.equal(ours.eval()(**batch).logits, converted.eval()(**batch).logits)

    # bf16 (what GPUs train in): the all-to-alls carry bf16 rows; the experts multiply other rows alongside.
    bf16 = dict(dtype=torch.bfloat16)
    single = SwitchForConditionalGeneration.from_pretrained(folders["top1_capacity"], **bf16).eval()
    parallel = SwitchForConditionalGeneration.from_pretrained(
        folders["top1_capacity"], expert_parallel_size=world, **bf16
    )
    expected = this_ranks_rows({"logits": single(**random_batch(batch=2 * world, seed=4)).logits})["logits"]
    bf16_error = (parallel.eval()(**batch).logits - expected).abs().max().item()
    assert bf16_error < 0.05 * expected.abs().max().item(), bf16_error
    return {**results, "errors": errors, "max_bf16_logit_error": bf16_error}


def _compare_with_one_process(folder: Path, gradient_checkpointing: bool) -> dict:
    world = dist.get_world_size()
    batch = random_batch(batch=2 * world, source=12, target=7, seed=3)
    reference = SwitchForConditionalGeneration.from_pretrained(folder).train()
    reference_output = reference(**batch)
    reference_output.loss.backward()

    model = SwitchForConditionalGeneration.from_pretrained(folder, expert_parallel_size=world).train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    output = model(**this_ranks_rows(batch))
    # The mean over ranks of each rank's mean loss is the whole batch's mean (equal rows and lengths).
    (output.loss / world).backward()

    rows = this_ranks_rows({"logits": reference_output.logits})["logits"]
    logits_error = (output.logits - rows).abs().max().item()
    assert logits_error < TOLERANCE, logits_error

    reference_parameters = dict(reference.named_parameters())
    gradient_error = 0.0
    for name, parameter in model.named_parameters():
        gradient = parameter.grad
        expected = reference_parameters[name].grad
        if getattr(parameter, "allreduce", True):
            dist.all_reduce(gradient)  # data parallel: DeepSpeed's engine would do this
        else:
            first = dist.get_rank() * parameter.shape[0]
            expected = expected[first : first + parameter.shape[0]]
        gradient_error = max(gradient_error, (gradient - expected).abs().max().item())
    assert gradient_error < TOLERANCE, gradient_error

    length = dict(min_new_tokens=6, max_new_tokens=6, do_sample=False)  # no early end: equal lengths on all ranks
    greedy = model.eval().generate(**this_ranks_rows(batch), **length)
    expected_greedy = this_ranks_rows({"ids": reference.eval().generate(**batch, **length)})
    assert torch.equal(greedy, expected_greedy["ids"])
    return {"max_logit_error": logits_error, "max_gradient_error": gradient_error}


def engine_config(stage: int, deepspeed_optimizer: bool) -> dict:
    fields = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default; the step is compared unclipped
    }
    if deepspeed_optimizer:
        # DeepSpeed builds the optimizer (and its MoE groups); torch's Adam, since its own compiles for minutes.
        fields["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}
    return fields


def initialize(folder: Path, stage: int, deepspeed_optimizer: bool, expert_parallel_size: int, optimizer_class=None):
    model = SwitchForConditionalGeneration.from_pretrained(folder, expert_parallel_size=expert_parallel_size).train()
    optimizer = None
    if not deepspeed_optimizer:
        optimizer_class = optimizer_class or torch.optim.AdamW
        optimizer = optimizer_class(moe_optimizer_groups([{"params": list(model.parameters())}]), lr=1e-2)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=None if optimizer else model.parameters(),
        config=engine_config(stage, deepspeed_optimizer),
    )
    return engine


def train_steps(engine, steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        loss = engine(**this_ranks_rows(random_batch(batch=2 * dist.get_world_size(), seed=10 + step))).loss
        engine.backward(loss)
        engine.step()
        end_balancing_step(engine.module)
        losses.append(loss.item())
    return losses


def steps_matching_one_process(engine, batches: list[dict], expected: list[float]) -> list[float]:
    """Steps of `engine`, each rank on its rows of each batch; their losses, averaged over the ranks, must equal
    `expected`, the losses of one process on the whole batches (`one_process_losses`)."""
    losses = []
    for batch in batches:
        loss = engine(**this_ranks_rows(batch)).loss
        engine.backward(loss)
        engine.step()
        end_balancing_step(engine.module)
        dist.all_reduce(mean := loss.detach() / dist.get_world_size())
        losses.append(mean.item())
    assert max(abs(a - b) / b for a, b in zip(losses, expected, strict=True)) < TOLERANCE, (losses, expected)
    return losses


def gathered_logits(model, batch) -> torch.Tensor:
    logits = model(**this_ranks_rows(batch)).logits.contiguous()
    pieces = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, logits)
    return torch.cat(pieces)


def engine(directory: Path, expert_parallel_size: int, stage: int = 2, deepspeed_optimizer: bool = False) -> dict:
    """Train under deepspeed.initialize, save_checkpoint, resume in a fresh engine; consolidate the checkpoint and
    the live model into single-process models with the expert-parallel model's logits."""
    folder = reference_folder(directory)
    batch = random_batch(batch=2 * dist.get_world_size(), seed=99)
    trained = initialize(folder, stage, deepspeed_optimizer, expert_parallel_size)
    assert trained.has_moe_layers
    losses = train_steps(trained, 3)
    trained.save_checkpoint(directory / "deepspeed")
    checkpoint_logits = gathered_logits(trained.module.eval(), batch)
    expert_files = list((directory / "deepspeed" / "global_step3").glob("layer_*_expert_*"))
    # 4 sparse layers x 4 experts, one file each, whichever rank holds the expert.
    assert len(expert_files) == 16, sorted(path.name for path in expert_files)

    resumed = initialize(folder, stage, deepspeed_optimizer, expert_parallel_size)
    resumed.load_checkpoint(directory / "deepspeed")
    resumed_parameters = resumed.module.parameters()
    for (name, parameter), resumed_parameter in zip(trained.module.named_parameters(), resumed_parameters, strict=True):
        assert torch.equal(parameter, resumed_parameter), name
    trained_biases = {name: bias for name, bias in trained.module.named_buffers() if name.endswith("expert_bias")}
    assert len(trained_biases) == 4 and all(bias.any() for bias in trained_biases.values())
    for name, bias in resumed.module.named_buffers():
        if name.endswith("expert_bias"):
            assert torch.equal(bias, trained_biases[name]), name
    trained.module.train()
    next_losses = train_steps(trained, 1), train_steps(resumed, 1)
    assert next_losses[0] == next_losses[1], next_losses

    live_logits = gathered_logits(trained.module.eval(), batch)
    trained.module.save_pretrained(directory / "consolidated")  # collective: gathers the experts
    live_state = consolidated_state_dict(trained.module)
    errors = {}
    if dist.get_rank() == 0:
        single = SwitchForConditionalGeneration.from_pretrained(directory / "consolidated").eval()
        assert single.config.expert_parallel_size == 1
        errors["consolidated_folder"] = (single(**batch).logits - live_logits).abs().max().item()
        single.load_state_dict(live_state, strict=True)
        errors["consolidated_state_dict"] = (single(**batch).logits - live_logits).abs().max().item()
        single.load_state_dict(deepspeed_checkpoint_state_dict(directory / "deepspeed"), strict=True)
        errors["deepspeed_checkpoint"] = (single(**batch).logits - checkpoint_logits).abs().max().item()
        assert max(errors.values()) < TOLERANCE, errors
    dist.barrier()
    return {"losses": losses + list(next_losses[0]), "expert_files": len(expert_files), **errors}


def training_step(directory: Path, expert_parallel_size: int, checkpoint: str | None = None) -> dict:
    """One ZeRO-2 SGD step of the engine (expert gradients reduced over the expert-data-parallel group, the others
    over all ranks) == one SGD step of a single process on the whole batch."""
    folder = reference_folder(directory)
    batch = random_batch(batch=2 * dist.get_world_size(), seed=5)
    reference = SwitchForConditionalGeneration.from_pretrained(folder).train()
    reference(**batch).loss.backward()
    expected = {name: parameter - 1e-2 * parameter.grad for name, parameter in reference.named_parameters()}

    model = initialize(folder, 2, False, expert_parallel_size, optimizer_class=torch.optim.SGD)
    model.backward(model(**this_ranks_rows(batch)).loss)
    model.step()
    updated = consolidated_state_dict(model.module)
    errors = {name: (updated[name] - value).abs().max().item() for name, value in expected.items()}
    error = max(errors.values())
    assert error < TOLERANCE, sorted(errors.items(), key=lambda item: -item[1])[:6]
    result = {"max_parameter_error": error, "optimizer_partitions": _optimizer_partitions(model.optimizer)}

    if checkpoint is not None:  # written by the engine scenario under another expert-parallel size
        model.load_checkpoint(checkpoint, load_optimizer_states=False, load_lr_scheduler_states=False)
        loaded, saved = consolidated_state_dict(model.module), deepspeed_checkpoint_state_dict(checkpoint)
        assert all(torch.equal(loaded[name], saved[name]) for name in saved)
        result["loaded_checkpoint_of_other_size"] = True
    return result


def _optimizer_partitions(optimizer) -> list[dict]:
    """Per parameter group of a ZeRO-1/2 optimizer: whether it holds experts, the ranks it is partitioned over, and
    this rank's float32 partition against the group's flattened size (DeepSpeed issue 7156: expert optimizer states
    reported unpartitioned under expert parallelism)."""
    groups = []
    for index, flat in enumerate(optimizer.bit16_groups_flat):
        groups.append(
            {
                "experts": bool(optimizer.optimizer.param_groups[index].get("moe", False)),
                "ranks": dist.get_world_size(group=optimizer.real_dp_process_group[index]),
                "partition": optimizer.single_partition_of_fp32_groups[index].numel(),
                "flat": flat.numel(),
            }
        )
    return groups


def zero3(directory: Path, expert_parallel_size: int) -> dict:
    """ZeRO-3 without expert parallelism (global-batch balancing, expert bias): every parameter partitioned over
    the ranks and gathered per module. Ranks route their own batches of 2 x 5 tokens over 8 experts (some expert
    empty on some rank): three AdamW steps give the losses of one process on the whole batch; a checkpoint resumes in
    a fresh engine with the same next loss; the 16-bit consolidated state dict (a `save_pretrained` folder) and
    `zero_to_fp32` both load in one process with the engine's logits."""
    assert expert_parallel_size == 1
    options = dict(num_experts=8, expert_capacity=None, capacity_factor=None, load_balancing_scope="global_batch")
    folder = reference_folder(directory, **options)
    batches = [random_batch(batch=2 * dist.get_world_size(), source=5, target=4, seed=10 + step) for step in range(4)]
    expected = one_process_losses(SwitchForConditionalGeneration.from_pretrained(folder).train(), batches[:3], 1e-2)

    engine = initialize(folder, 3, False, 1)
    tokens_per_expert = []
    for module in engine.module.modules():
        if isinstance(module, SwitchExperts):
            module.register_forward_hook(lambda m, inputs, out: tokens_per_expert.append(inputs[1].tokens_per_expert))
    losses = steps_matching_one_process(engine, batches[:3], expected)
    empty = torch.tensor([int(any((counts == 0).any() for counts in tokens_per_expert))])
    dist.all_reduce(empty)
    assert empty.item() > 0, "some rank must leave some expert without tokens"

    engine.save_checkpoint(directory / "zero3")
    resumed = initialize(folder, 3, False, 1)
    resumed.load_checkpoint(directory / "zero3")
    next_losses = [
        engine(**this_ranks_rows(batches[3])).loss.item(),
        resumed(**this_ranks_rows(batches[3])).loss.item(),
    ]
    assert next_losses[0] == next_losses[1], next_losses

    engine.module.eval()
    check = random_batch(batch=2 * dist.get_world_size(), seed=99)
    logits = gathered_logits(engine.module, check)
    consolidated = engine._zero3_consolidated_16bit_state_dict()  # collective; the full weights on rank 0
    errors = {}
    if dist.get_rank() == 0:
        engine.module.save_pretrained(directory / "consolidated", state_dict=consolidated)
        single = SwitchForConditionalGeneration.from_pretrained(directory / "consolidated").eval()
        errors["consolidated_folder"] = (single(**check).logits - logits).abs().max().item()
        fp32 = get_fp32_state_dict_from_zero_checkpoint(directory / "zero3")
        single.load_state_dict(fp32, strict=False)
        errors["zero_to_fp32"] = (single(**check).logits - logits).abs().max().item()
        assert max(errors.values()) < TOLERANCE, errors
    dist.barrier()
    return {"losses": losses, "expected": expected, "next_losses": next_losses, **errors}


def lora_engine(base: Path, adapter: Path, expert_parallel_size: int):
    """ZeRO-2 over an expert-parallel base model with `adapter` loaded trainable (this rank's experts' factors)."""
    model = load_adapter(
        SwitchForConditionalGeneration.from_pretrained(base, expert_parallel_size=expert_parallel_size),
        adapter,
        is_trainable=True,
    ).train()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(moe_optimizer_groups([{"params": trainable}]), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=engine_config(2, False))
    return engine


def lora(directory: Path, expert_parallel_size: int) -> dict:
    """LoRA on attention and experts of an expert-parallel model, each rank holding its experts' adapters: loaded
    from a one-process adapter (cut to the rank's experts), three ZeRO-2 AdamW steps give the losses of one process on
    the whole batch; a DeepSpeed checkpoint resumes with the same parameters and next loss; the adapter saved from the
    gathered state dict holds every expert and loads, in one process and onto an expert-parallel model, with the
    engine's logits."""
    world = dist.get_world_size()
    base = reference_folder(directory)
    batches = [random_batch(batch=2 * world, seed=10 + step) for step in range(4)]
    if dist.get_rank() == 0:
        torch.manual_seed(1)
        single = SwitchForConditionalGeneration.from_pretrained(base)
        adapted = apply_lora(single, lora_config("attention+experts", single.config, r=4))
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:  # a fresh B is zero: the adapter would not matter to the first step
                torch.nn.init.normal_(parameter, std=0.1)
        adapted.save_pretrained(directory / "initial_adapter")
    dist.barrier()
    single = load_adapter(
        SwitchForConditionalGeneration.from_pretrained(base), directory / "initial_adapter", is_trainable=True
    )
    expected = one_process_losses(single.train(), batches[:3], 1e-2)

    engine = lora_engine(base, directory / "initial_adapter", expert_parallel_size)
    losses = steps_matching_one_process(engine, batches[:3], expected)

    # As the Trainer saves and resumes a peft model. DeepSpeed's ZeRO-2 checkpoint of frozen parameters (the
    # default, exclude_frozen_parameters=False) holds rank 0's frozen experts and loads them onto every rank.
    engine.save_checkpoint(directory / "lora_deepspeed", exclude_frozen_parameters=True)
    resumed = lora_engine(base, directory / "initial_adapter", expert_parallel_size)
    resumed.load_checkpoint(directory / "lora_deepspeed", load_module_strict=False)
    for (name, parameter), resumed_parameter in zip(
        engine.module.named_parameters(), resumed.module.parameters(), strict=True
    ):
        assert torch.equal(parameter, resumed_parameter), name
    next_losses = [model(**this_ranks_rows(batches[3])).loss.item() for model in (engine, resumed)]
    assert next_losses[0] == next_losses[1], next_losses

    check = random_batch(batch=2 * world, seed=99)
    logits = gathered_logits(engine.module.eval(), check)
    gathered = consolidated_state_dict(engine.module)  # collective
    if dist.get_rank() == 0:
        engine.module.save_pretrained(directory / "trained_adapter", state_dict=gathered)
    dist.barrier()
    saved = load_file(directory / "trained_adapter" / "adapter_model.safetensors")
    expert_factors = {key: tensor.shape[0] for key, tensor in saved.items() if ".experts.lora_" in key}
    assert expert_factors and set(expert_factors.values()) == {4}, expert_factors
    errors = {}
    reloaded = load_adapter(
        SwitchForConditionalGeneration.from_pretrained(base, expert_parallel_size=expert_parallel_size),
        directory / "trained_adapter",
    )
    errors["expert_parallel_reload"] = (gathered_logits(reloaded.eval(), check) - logits).abs().max().item()
    if dist.get_rank() == 0:
        one_process = load_adapter(SwitchForConditionalGeneration.from_pretrained(base), directory / "trained_adapter")
        errors["one_process_reload"] = (one_process.eval()(**check).logits - logits).abs().max().item()
        assert max(errors.values()) < TOLERANCE, errors
    dist.barrier()
    return {"losses": losses, "expected": expected, "next_losses": next_losses, **errors}


SCENARIOS = {
    "equivalence": equivalence,
    "engine": engine,
    "training_step": training_step,
    "zero3": zero3,
    "lora": lora,
}


if __name__ == "__main__":
    scenario, directory, expert_parallel_size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    options = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    result = SCENARIOS[scenario](directory, expert_parallel_size, **options)
    if dist.get_rank() == 0:
        (directory / f"{scenario}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()  # before interpreter exit tears gloo's threads down (see training.end_training)
