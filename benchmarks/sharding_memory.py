"""Per-rank memory of one Switch model under each data-parallel engine, on CPU ranks (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 4 tests/deepspeed_cpu_entry.py \
        benchmarks/sharding_memory.py ENGINE OUT.json

ENGINE: "ddp" (every rank holds everything), "ep2-zero2" (DeepSpeed expert parallelism over 2 ranks, ZeRO-2),
"zero3" (DeepSpeed ZeRO-3, no expert parallelism) or "fsdp2" (`hf_switch.sharding.shard_model`). The model: d_model
256, d_ff 1024, 4+4 layers, 16 experts in every other layer (41 M parameters, 82 % of them experts), AdamW, two
training steps on 4 x 64 tokens per rank. Each rank reports its resident memory above what the imports took: after
building and wrapping the model, and at its peak over the steps (the kernel's high-water mark, reset after
building). Rank 0 writes every rank's numbers to OUT.json.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from hf_switch import SwitchConfig, SwitchForConditionalGeneration
from hf_switch.sharding import shard_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import device  # noqa: E402


def build(expert_parallel_size: int) -> SwitchForConditionalGeneration:
    torch.manual_seed(0)
    config = SwitchConfig(
        vocab_size=8192,
        d_model=256,
        d_kv=64,
        d_ff=1024,
        num_layers=4,
        num_heads=4,
        num_experts=16,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
        capacity_factor=None,
        dropout_rate=0.0,
        expert_parallel_size=expert_parallel_size,
        decoder_start_token_id=0,
    )
    return SwitchForConditionalGeneration(config).train()


def deepspeed_engine(stage: int, expert_parallel_size: int):
    """A DeepSpeed engine with buckets sized for this model (DeepSpeed's defaults, 5e8 elements, exceed it); under
    ZeRO-3 the model is built partitioned (`deepspeed.zero.Init`), as `from_pretrained` does under DeepSpeed."""
    buckets = 5_000_000
    zero = {"stage": stage, "reduce_bucket_size": buckets, "allgather_bucket_size": buckets}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=buckets, stage3_param_persistence_threshold=10_000)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    }
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=stage == 3):
        model = build(expert_parallel_size)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine, lambda loss: engine.backward(loss), engine.step


def wrapped(engine: str):
    """`(model, backward, step)` for one engine."""
    if engine == "ep2-zero2":
        return deepspeed_engine(stage=2, expert_parallel_size=2)
    if engine == "zero3":
        return deepspeed_engine(stage=3, expert_parallel_size=1)
    model = build(expert_parallel_size=1)
    if engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif engine == "fsdp2":
        shard_model(model)
    else:
        raise ValueError(f"engine={engine!r}: choose ddp, ep2-zero2, zero3 or fsdp2.")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, lambda loss: loss.backward(), step


def main(engine: str, out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    imported = device.memory_mib()
    model, backward, optimizer_step = wrapped(engine)
    generator = torch.Generator().manual_seed(dist.get_rank())

    def training_step():
        batch = {
            "input_ids": torch.randint(2, 8192, (4, 64), generator=generator),
            "labels": torch.randint(2, 8192, (4, 64), generator=generator),
        }
        backward(model(**batch).loss)
        optimizer_step()

    built, peak = device.step_memory_mib(training_step, steps=2)
    measured = {"built_mib": built - imported, "peak_mib": peak - imported}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, measured)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"engine": engine, "ranks": gathered}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
