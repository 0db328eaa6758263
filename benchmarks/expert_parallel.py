"""The all-to-all's share of an expert-parallel training step, next to the same step without expert parallelism.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/expert_parallel.py [--json FILE]
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 4 benchmarks/expert_parallel.py [--json FILE]

Every rank holds two copies of one model: with every expert (`expert_parallel_size=1`, no communication) and with
its share of the experts (`expert_parallel_size` = the world size). Rounds alternate between them; each round is a
forward and backward pass on this rank's batch (no optimizer step, no gradient reduction: both would be the same in
the two setups but for the expert gradients' smaller all-reduce group). The time inside `all_to_all_single`
(token counts, tokens, and outputs, forward and backward) includes waiting for the slowest rank of the group.
"""

import argparse
import json
import statistics
import sys
import time

import deepspeed.comm.torch  # noqa: F401  (patched below through sys.modules)
import torch

# init_distributed JIT-compiles a shared-memory all-reduce op for CPUs (about a minute, cold); gloo does not need it.
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

import deepspeed  # noqa: E402

import hf_switch.expert_parallel as expert_parallel  # noqa: E402
from hf_switch import SwitchConfig, SwitchForConditionalGeneration  # noqa: E402


class AllToAllTimer:
    """Wraps `deepspeed.comm.all_to_all_single` as hf_switch calls it, summing the seconds spent inside."""

    def __init__(self):
        self.seconds = 0.0
        self.wrapped = expert_parallel.dist.all_to_all_single
        expert_parallel.dist.all_to_all_single = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        result = self.wrapped(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return result


def build(expert_parallel_size: int, seed: int = 0) -> SwitchForConditionalGeneration:
    config = SwitchConfig(
        vocab_size=8192, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4, num_experts=8,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, capacity_factor=1.25, dropout_rate=0.0,
        expert_parallel_size=expert_parallel_size,
    )  # fmt: skip
    torch.manual_seed(seed)
    return SwitchForConditionalGeneration(config).train()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", help="rank 0 writes the results here")
    arguments = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    models = {1: build(1), world: build(world)}
    generator = torch.Generator().manual_seed(rank)
    batch = {
        "input_ids": torch.randint(2, 8192, (8, 128), generator=generator),
        "labels": torch.randint(2, 8192, (8, 32), generator=generator),
    }
    timer = AllToAllTimer()
    seconds = {size: [] for size in models}
    all_to_all = []
    warmup = 2
    for round_index in range(warmup + arguments.rounds):
        for size, model in models.items():
            torch.distributed.barrier()
            timer.seconds, start = 0.0, time.perf_counter()
            model(**batch).loss.backward()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if round_index >= warmup:
                seconds[size].append(elapsed)
                if size == world:
                    all_to_all.append(timer.seconds)

    step = {size: statistics.median(values) for size, values in seconds.items()}
    result = {
        "ranks": world,
        "step_s_all_experts": step[1],
        "step_s_expert_parallel": step[world],
        "expert_parallel_over_all_experts": step[world] / step[1],
        "all_to_all_s": statistics.median(all_to_all),
        "all_to_all_share": statistics.median(a / s for a, s in zip(all_to_all, seconds[world], strict=True)),
    }
    medians = torch.tensor([result[key] for key in sorted(result)], dtype=torch.float64)
    torch.distributed.all_reduce(medians)  # the mean over ranks
    result = dict(zip(sorted(result), (medians / world).tolist(), strict=True))
    if rank == 0:
        print(json.dumps(result, indent=2))
        if arguments.json:
            with open(arguments.json, "w") as handle:
                json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
