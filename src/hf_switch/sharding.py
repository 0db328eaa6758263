"""Fully sharded data parallelism (FSDP2) for Switch models.

One FSDP unit per `SwitchBlock` (a block's experts are gathered and freed together, never split across units),
then the whole model for the embeddings, final norms and LM head: the model's `_no_split_modules`, which is also the
wrap policy accelerate's FSDP plugin takes (`configs/accelerate/fsdp2.yaml`); hf_switch's trainers make accelerate
leave the embeddings to the root unit too (`EmbeddingsInTheRootUnit`).

Uneven routing cannot hang it: a unit's parameters are gathered when the block runs, and every rank runs every
block, whichever experts its tokens chose (the experts of a layer are one stacked parameter per weight, not one
module per expert that a rank could skip).

accelerate 1.16 builds FSDP only on accelerator devices: on CPU ranks `Trainer(fsdp=...)` would train with plain
DDP, so `hf-switch train` refuses `--fsdp` there (see `check_fsdp_engine`), and `shard_model` is for loops that
call `torch.distributed.fsdp.fully_shard` themselves (torchrun, torchtitan-style).
"""

import functools

import torch
from torch.distributed.fsdp import fully_shard
from transformers import PreTrainedModel

from .modeling_switch import SwitchBlock


def shard_model(model: torch.nn.Module, **fully_shard_options) -> torch.nn.Module:
    """Apply `fully_shard` to every `SwitchBlock`, then to `model` (in place; returned for chaining).

    `fully_shard_options` (`mesh`, `reshard_after_forward`, `mp_policy`, `offload_policy`) go to every call.
    """
    for module in model.modules():
        if isinstance(module, SwitchBlock):
            fully_shard(module, **fully_shard_options)
    return fully_shard(model, **fully_shard_options)


def embeddings_left_to_the_root_unit(prepare):
    """Wrap `Accelerator.prepare` so that accelerate's FSDP2 preparation leaves an encoder-decoder's embeddings and
    LM head to the root unit, as `shard_model` does.

    accelerate 1.16 puts the modules that `get_input_embeddings()` / `get_output_embeddings()` return into a unit of
    their own. An encoder-decoder's stacks hold the shared embedding weight in modules of their own
    (`encoder.embed_tokens`, `decoder.embed_tokens`, tied to `shared`: Switch models, and transformers' T5, which a
    distilled student is), which stay in the root unit, and torch 2.13 refuses a parameter in two units on the first
    forward ("Parameter 'shared.weight' is shared with a parameter already managed by another FSDP group"). While
    `prepare` runs, the models among its arguments (also inside a peft model) whose embedding weight other modules
    share name no embeddings.
    """

    @functools.wraps(prepare)
    def prepare_with_embeddings_in_the_root_unit(*objects, **options):
        models = [
            module
            for candidate in objects
            if isinstance(candidate, torch.nn.Module)
            for module in candidate.modules()
            if isinstance(module, PreTrainedModel) and _others_share_its_embedding(module)
        ]
        for model in models:
            model.get_input_embeddings = model.get_output_embeddings = _no_embeddings
        try:
            return prepare(*objects, **options)
        finally:
            for model in models:
                del model.get_input_embeddings, model.get_output_embeddings

    return prepare_with_embeddings_in_the_root_unit


def _others_share_its_embedding(model: PreTrainedModel) -> bool:
    embeddings = model.get_input_embeddings()
    if embeddings is None:
        return False
    own = {embeddings, model.get_output_embeddings()}
    return any(getattr(module, "weight", None) is embeddings.weight for module in model.modules() if module not in own)


def _no_embeddings() -> None:
    return None


class EmbeddingsInTheRootUnit:
    """Trainer mixin: under FSDP2, accelerate's preparation leaves shared encoder-decoder embeddings to the root
    unit (`embeddings_left_to_the_root_unit`)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.is_fsdp_enabled and self.accelerator.is_fsdp2:
            self.accelerator.prepare = embeddings_left_to_the_root_unit(self.accelerator.prepare)


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
