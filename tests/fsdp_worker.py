"""One rank of `tests/test_sharding.py`, started by torchrun (gloo, CPU): FSDP2 training of a tiny Switch model.

`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py DIR`: each rank trains on its
half of every global batch of `test_sharding.global_batches()`, saves a distributed checkpoint after step 2, then a
fresh model resumes from it and redoes step 3; the full state dict is saved as one ordinary folder (DIR/model).
Rank 0 writes DIR/run.json: the global losses, the resumed step's loss, the expert biases, and every rank's tokens
per expert in each sparse layer.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import tiny_model
from test_sharding import CONFIG, LEARNING_RATE, global_batches
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from hf_switch.experts import SwitchExperts
from hf_switch.routing import SwitchRouter, end_balancing_step
from hf_switch.sharding import shard_model

folder = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
tokens_per_expert = []


def build(seed):
    model = tiny_model(seed, **CONFIG).train()
    for module in model.modules():
        if isinstance(module, SwitchExperts):
            module.register_forward_hook(lambda m, inputs, out: tokens_per_expert.append(inputs[1].tokens_per_expert))
    shard_model(model)
    return model, torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)


def step(model, optimizer, batch) -> float:
    rows = batch["input_ids"].shape[0] // world
    local = {name: tensor[rank * rows : (rank + 1) * rows] for name, tensor in batch.items()}
    loss = model(**local).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    end_balancing_step(model)
    dist.all_reduce(global_loss := loss.detach().clone())
    return global_loss.item() / world


model, optimizer = build(seed=0)
batches = global_batches()
losses = [step(model, optimizer, batch) for batch in batches[:2]]
model_state, optimizer_state = get_state_dict(model, optimizer)
dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder / "checkpoint")
losses.append(step(model, optimizer, batches[2]))

resumed, resumed_optimizer = build(seed=1)
model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
state = {"model": model_state, "optimizer": optimizer_state}
dcp.load(state, checkpoint_id=folder / "checkpoint")
set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
resumed_loss = step(resumed, resumed_optimizer, batches[2])

full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
model.save_pretrained(folder / "model", state_dict=full)  # global rank 0 writes; the others return
gathered = [None] * world
dist.all_gather_object(gathered, [counts.tolist() for counts in tokens_per_expert])
if rank == 0:
    biases = [module.expert_bias.tolist() for module in model.modules() if isinstance(module, SwitchRouter)]
    run = {"losses": losses, "resumed_loss": resumed_loss, "expert_bias": biases, "tokens_per_expert": gathered}
    (folder / "run.json").write_text(json.dumps(run))
dist.barrier()  # without it, rank 0 aborted now and then (SIGABRT) after its peer destroyed the group and exited
dist.destroy_process_group()
