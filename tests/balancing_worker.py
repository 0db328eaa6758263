"""One rank of `test_global_batch_counts_and_expert_biases_agree_over_data_parallel_processes`, started by torchrun
(gloo, CPU).

`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/balancing_worker.py DIR`: each rank runs one
training forward on its own batch and closes the optimizer step; rank 0 writes every rank's per-router step counts
and expert biases to DIR/ranks.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import random_batch, tiny_model
from test_balancing import GLOBAL_WITH_BIAS, _routers

from hf_switch.routing import end_balancing_step

dist.init_process_group("gloo")
rank = dist.get_rank()
model = torch.nn.parallel.DistributedDataParallel(tiny_model(**GLOBAL_WITH_BIAS).train())
model(**random_batch(seed=10 + rank))
counts = [router.step_expert_counts.tolist() for router in _routers(model)]
end_balancing_step(model)
biases = [router.expert_bias.tolist() for router in _routers(model)]
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, {"counts": counts, "biases": biases})
if rank == 0:
    Path(sys.argv[1], "ranks.json").write_text(json.dumps(gathered))
dist.barrier()  # without it, rank 0 aborted now and then (SIGABRT) after its peer destroyed the group and exited
dist.destroy_process_group()
