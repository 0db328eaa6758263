"""Fully sharded data parallelism (FSDP2) for Switch models.

One FSDP unit per `SwitchBlock` (a block's experts are gathered and freed together, never split across units),
then the whole model for the embeddings, final norms and LM head: the model's `_no_split_modules`, which is also the
wrap policy accelerate's FSDP plugin takes (`configs/accelerate/fsdp2.yaml`).

Uneven routing cannot hang it: a unit's parameters are gathered when the block runs, and every rank runs every
block, whichever experts its tokens chose (the experts of a layer are one stacked parameter per weight, not one
module per expert that a rank could skip).

accelerate 1.16 builds FSDP only on accelerator devices: on CPU ranks `Trainer(fsdp=...)` would train with plain
DDP, so `hf-switch train` refuses `--fsdp` there (see `check_fsdp_engine`), and `shard_model` is for loops that
call `torch.distributed.fsdp.fully_shard` themselves (torchrun, torchtitan-style).
"""

import torch
from torch.distributed.fsdp import fully_shard

from .modeling_switch import SwitchBlock


def shard_model(model: torch.nn.Module, **fully_shard_options) -> torch.nn.Module:
    """Apply `fully_shard` to every `SwitchBlock`, then to `model` (in place; returned for chaining).

    `fully_shard_options` (`mesh`, `reshard_after_forward`, `mp_policy`, `offload_policy`) go to every call.
    """
    for module in model.modules():
        if isinstance(module, SwitchBlock):
            fully_shard(module, **fully_shard_options)
    return fully_shard(model, **fully_shard_options)


def check_fsdp_engine(trainer) -> None:
    """Refuse a Trainer whose `fsdp` argument accelerate did not turn into FSDP (CPU ranks), rather than let it
    train with DDP under the FSDP flags."""
    if trainer.args.fsdp and not trainer.is_fsdp_enabled:
        raise ValueError(
            f"--fsdp {trainer.args.fsdp!r}: accelerate builds FSDP on accelerator devices only, and this run is "
            f"{trainer.accelerator.distributed_type.value} on {trainer.args.device}, where it would train with plain "
            "data parallelism instead. Drop --fsdp (DDP), use DeepSpeed (--deepspeed configs/deepspeed/...), or "
            "shard with hf_switch.sharding.shard_model in your own loop."
        )
