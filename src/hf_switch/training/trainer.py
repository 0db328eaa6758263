"""`SwitchTrainer`: transformers' `Seq2SeqTrainer` that closes each optimizer step for routing, evaluates the
cross-entropy that a dense model is compared by, and trains expert-parallel models under DeepSpeed."""

from functools import partial

import torch
from transformers import Seq2SeqTrainer

from ..modeling_switch import SwitchForConditionalGeneration
from ..sharding import EmbeddingsInTheRootUnit
from .callbacks import BalancingStepCallback


class SwitchTrainer(EmbeddingsInTheRootUnit, Seq2SeqTrainer):
    """A `Seq2SeqTrainer` for Switch models, also those whose experts are spread over ranks.

    After each optimizer step it clears the routers' per-step expert counts (`BalancingStepCallback`, which the
    global-batch load-balancing loss reads). With `expert_parallel_size > 1` it puts the expert weights of the
    optimizer it builds in DeepSpeed MoE parameter groups (which ZeRO 1/2 require of a client optimizer), and gathers
    every expert when it saves, so that its folders load in one process. Under FSDP2 it has accelerate leave the
    embeddings to the root unit (`sharding.embeddings_left_to_the_root_unit`). For other models it is
    `Seq2SeqTrainer` with that callback.

    In evaluation, `eval_loss` is the cross-entropy alone, as a dense T5's is: the model's own loss adds the routers'
    weighted load-balancing and z losses, regularisers of training that would count against a Switch model in any
    comparison (about 0.04 nats at the default coefficients). Their weighted sum is reported beside it as
    `eval_router_loss`. The training loss keeps them: it is what the optimizer minimises.
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

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        router_losses = []
        hook = partial(_cross_entropy_as_loss, router_losses, self._loss_scale_across_processes)
        hooks = [
            module.register_forward_hook(hook, with_kwargs=True)
            for module in self.model.modules()
            if isinstance(module, SwitchForConditionalGeneration)
        ]
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        finally:
            for hook in hooks:
                hook.remove()
        if hooks:  # the same on every process, so all of them join the reduction
            total = torch.stack(router_losses).sum() if router_losses else torch.zeros((), device=self.args.device)
            totals = torch.stack([total.float(), torch.tensor(float(len(router_losses)), device=total.device)])
            router_loss, batches = self.accelerator.reduce(totals, reduction="sum").tolist()
            if batches:
                output.metrics[f"{metric_key_prefix}_router_loss"] = router_loss / batches
        return output

    def _save(self, output_dir=None, state_dict=None):
        # Trainer.save_model calls this on every rank under DeepSpeed; the gather needs all of them.
        if self._is_expert_parallel:
            from ..expert_parallel import consolidated_state_dict

            state_dict = consolidated_state_dict(self.accelerator.unwrap_model(self.model))
        super()._save(output_dir, state_dict=state_dict)

    @property
    def _loss_scale_across_processes(self) -> int:
        """What `compute_loss` multiplies the loss of a forward given `num_items_in_batch` by: with tokens averaged
        across processes, the model weighs each process's loss by its share of all processes' tokens."""
        if not (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs):
            return 1
        return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu

    @property
    def _is_expert_parallel(self) -> bool:
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        return getattr(config, "expert_parallel_size", 1) > 1


def _cross_entropy_as_loss(router_losses: list, loss_scale: int, module, args, kwargs, output):
    """Forward hook: replace a labelled forward's loss by its cross-entropy (the model's loss less the weighted
    router losses it includes); keep those in `router_losses`, scaled as `compute_loss` scales the loss."""
    if output.loss is None:
        return None
    scale = loss_scale if kwargs.get("num_items_in_batch") is not None else 1
    router_losses.append(output.router_loss.detach() * scale)
    output.loss = output.loss - output.router_loss
    return output
