"""`SwitchTrainer`: transformers' `Seq2SeqTrainer` that closes each optimizer step for routing and trains
expert-parallel models under DeepSpeed."""

import torch
from transformers import Seq2SeqTrainer

from .callbacks import BalancingStepCallback


class SwitchTrainer(Seq2SeqTrainer):
    """A `Seq2SeqTrainer` for Switch models, also those whose experts are spread over ranks.

    After each optimizer step it clears the routers' per-step expert counts (`BalancingStepCallback`, which the
    global-batch load-balancing loss reads). With `expert_parallel_size > 1` it puts the expert weights of the
    optimizer it builds in DeepSpeed MoE parameter groups (which ZeRO 1/2 require of a client optimizer), and gathers
    every expert when it saves, so that its folders load in one process. For other models it is `Seq2SeqTrainer`
    with that callback.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(BalancingStepCallback)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        # With an optimizer section in the DeepSpeed config this is accelerate's placeholder: DeepSpeed builds the
        # optimizer, and its MoE groups, itself.
        if self._is_expert_parallel and isinstance(optimizer, torch.optim.Optimizer):
            from ..expert_parallel import moe_optimizer_groups

            groups, optimizer.param_groups = moe_optimizer_groups(optimizer.param_groups), []
            for group in groups:  # before any step: the optimizer holds no state yet
                optimizer.add_param_group(group)
        return optimizer

    def _save(self, output_dir=None, state_dict=None):
        # Trainer.save_model calls this on every rank under DeepSpeed; the gather needs all of them.
        if self._is_expert_parallel:
            from ..expert_parallel import consolidated_state_dict

            state_dict = consolidated_state_dict(self.accelerator.unwrap_model(self.model))
        super()._save(output_dir, state_dict=state_dict)

    @property
    def _is_expert_parallel(self) -> bool:
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        return getattr(config, "expert_parallel_size", 1) > 1
