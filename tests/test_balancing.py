"""Load balancing over the global batch: expert fractions summed over the micro-batches of an optimizer step and
over data-parallel processes, cleared by the Trainer after each optimizer step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import accumulating_trainer, random_batch, tiny_model
from transformers import TrainerCallback

from hf_switch.routing import SwitchRouter, end_balancing_step

WORKER = Path(__file__).parent / "balancing_worker.py"
GLOBAL = dict(load_balancing_scope="global_batch", capacity_factor=None, num_experts=4)
GLOBAL_WITH_BIAS = dict(GLOBAL, router_expert_bias=True, router_bias_update_rate=0.05)


def _routers(model) -> list[SwitchRouter]:
    return [module for module in model.modules() if isinstance(module, SwitchRouter)]


def _expected_aux_loss(router_logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`E * sum_e f_e * P_e` with `f_e` from `counts` and `P_e` the mean probability over this forward's tokens."""
    probs = router_logits.float().softmax(-1)
    return probs.shape[-1] * (counts / counts.sum() * probs.mean(dim=(0, 1))).sum()


def test_global_batch_balancing_counts_every_micro_batch_of_the_optimizer_step():
    model = tiny_model(**GLOBAL).train()
    first, second = random_batch(seed=1), random_batch(seed=2)
    out_first = model(**first, output_router_logits=True)
    first_choices = [logits.argmax(-1) for logits in out_first.encoder_router_logits]
    out_second = model(**second, output_router_logits=True)
    logits = out_second.encoder_router_logits[0]
    counts = torch.bincount(torch.cat([first_choices[0].flatten(), logits.argmax(-1).flatten()]), minlength=4)
    encoder_router = _routers(model.encoder)[0]
    assert torch.equal(encoder_router.step_expert_counts, counts)
    assert out_second.encoder_aux_loss.item() == pytest.approx(_expected_aux_loss(logits, counts.float()).item())

    end_balancing_step(model)
    assert all(not router.step_expert_counts.any() for router in _routers(model))
    # A step of one micro-batch is the loss of one routing group of the whole batch.
    per_batch = tiny_model(**{**GLOBAL, "load_balancing_scope": "group"}).train()
    per_batch.load_state_dict(model.state_dict())
    global_loss = model(**second).encoder_aux_loss
    assert global_loss.item() == pytest.approx(per_batch(**second).encoder_aux_loss.item(), rel=1e-6)


def test_global_batch_counts_stay_out_of_evaluation_and_saved_weights(tmp_path):
    model = tiny_model(**GLOBAL)
    with torch.no_grad():
        model(**random_batch())
    assert all(not router.step_expert_counts.any() for router in _routers(model))
    model.train()(**random_batch())
    assert "step_expert_counts" not in " ".join(model.state_dict())
    model.save_pretrained(tmp_path / "model")
    loaded = type(model).from_pretrained(tmp_path / "model")
    assert all(not router.step_expert_counts.any() for router in _routers(loaded))


class _RecordCounts(TrainerCallback):
    """Sums of the encoder router's step counts after each micro-batch (before `SwitchTrainer` clears them)."""

    def __init__(self, router):
        self.router, self.after_micro_batch = router, []

    def on_substep_end(self, args, state, control, **kwargs):
        self.after_micro_batch.append(int(self.router.step_expert_counts.sum()))

    def on_step_end(self, args, state, control, **kwargs):
        self.after_micro_batch.append(int(self.router.step_expert_counts.sum()))


def test_trainer_sums_counts_over_gradient_accumulation_and_clears_them_after_each_step(tmp_path):
    model = tiny_model(**GLOBAL).train()
    recorder = _RecordCounts(_routers(model.encoder)[0])
    accumulating_trainer(model, tmp_path, callbacks=[recorder]).train()
    tokens = 2 * 6  # encoder tokens of one micro-batch, no padding
    assert recorder.after_micro_batch == [tokens, 2 * tokens, tokens, 2 * tokens]
    assert not recorder.router.step_expert_counts.any()


@pytest.mark.slow
def test_global_batch_counts_and_expert_biases_agree_over_data_parallel_processes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, str(WORKER), str(tmp_path)], check=True, env=environment, timeout=300)
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert ranks[0] == ranks[1]  # every process holds the same counts, then the same biases
    model = tiny_model(**GLOBAL_WITH_BIAS).train()
    for rank in range(2):
        model(**random_batch(seed=10 + rank))
    assert ranks[0]["counts"] == [router.step_expert_counts.tolist() for router in _routers(model)]
    end_balancing_step(model)
    assert ranks[0]["biases"] == [router.expert_bias.tolist() for router in _routers(model)]
    assert any(any(bias) for bias in ranks[0]["biases"])
