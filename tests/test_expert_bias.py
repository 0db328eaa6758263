"""Auxiliary-loss-free balancing (Wang et al. 2024): a per-expert bias that moves which experts are chosen, never the
gates or a gradient, updated from each optimizer step's load."""

import pytest
import torch
from conftest import accumulating_trainer, random_batch, tiny_config, tiny_model
from transformers import TrainerCallback

from hf_switch import SwitchForConditionalGeneration
from hf_switch.conversion import save_as_switch_transformers
from hf_switch.hub import describe_balancing
from hf_switch.routing import SwitchRouter, chosen_expert_counts, end_balancing_step, update_expert_bias
from hf_switch.training.callbacks import add_routing_dashboard

BIAS = dict(router_expert_bias=True, capacity_factor=None, num_experts=4)


def _routers(model) -> list[SwitchRouter]:
    return [module for module in model.modules() if isinstance(module, SwitchRouter)]


def _max_violation(counts: torch.Tensor) -> float:
    return (counts.max() / counts.float().mean() - 1).item()


def test_expert_bias_changes_selection_but_not_gates_or_gradients():
    torch.manual_seed(0)
    router = SwitchRouter(tiny_config(**BIAS)).train()
    hidden = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # outweighs any probability: expert 2 everywhere
    decision = router(hidden, mask)
    assert (decision.expert_index == 2).all()
    unbiased_probs = torch.softmax(router.classifier(hidden), dim=-1)
    assert torch.allclose(decision.expert_weight[..., 0], unbiased_probs[..., 2])

    decision.expert_weight.sum().backward()
    biased_gradient = router.classifier.weight.grad.clone()
    router.classifier.weight.grad = None
    torch.softmax(router.classifier(hidden), dim=-1)[..., 2].sum().backward()
    assert torch.allclose(biased_gradient, router.classifier.weight.grad)
    assert not router.expert_bias.requires_grad


def test_expert_bias_update_brings_the_max_violation_of_a_skewed_router_under_0_1():
    torch.manual_seed(0)
    router = SwitchRouter(tiny_config(**BIAS, router_bias=True, router_bias_update_rate=1e-2)).train()
    with torch.no_grad():
        router.classifier.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))  # expert 0 takes most tokens
    hidden = torch.randn(8, 32, 16)
    mask = torch.ones(8, 32, dtype=torch.bool)
    violations = []
    for _ in range(300):
        router.step_expert_counts += chosen_expert_counts(router(hidden, mask))
        violations.append(_max_violation(router.step_expert_counts))
        end_balancing_step(router)
    assert violations[0] > 1.0
    assert min(violations) < 0.1
    assert max(violations[-50:]) < 0.2  # and it stays balanced, up to the oscillation of sign steps


def test_expert_bias_after_accumulated_micro_batches_equals_one_batch_of_their_size():
    accumulated, whole = tiny_model(**BIAS).train(), tiny_model(**BIAS).train()
    batch = random_batch(batch=4)
    for half in (slice(0, 2), slice(2, 4)):
        accumulated(**{name: tensor[half] for name, tensor in batch.items()})
    whole(**batch)
    for model in (accumulated, whole):
        end_balancing_step(model)
    biases = [[router.expert_bias for router in _routers(model)] for model in (accumulated, whole)]
    assert all(bias.any() for bias in biases[1])
    assert all(torch.equal(a, b) for a, b in zip(*biases, strict=True))


def test_expert_bias_is_frozen_in_evaluation_and_generation():
    model = tiny_model(**BIAS)
    for router in _routers(model):
        router.expert_bias.copy_(torch.tensor([0.1, -0.1, 0.0, 0.0]))
    before = [router.expert_bias.clone() for router in _routers(model)]
    batch = random_batch()
    with torch.no_grad():
        model(**batch)
    model.generate(input_ids=batch["input_ids"], max_new_tokens=5)
    end_balancing_step(model)
    assert all(torch.equal(a, router.expert_bias) for a, router in zip(before, _routers(model), strict=True))


@pytest.mark.parametrize("routing_group", ["sequence", "batch"])
def test_expert_bias_keeps_cached_decoding_exact_and_evaluation_batch_independent(routing_group):
    model = tiny_model(**BIAS, routing_group=routing_group)
    for router in _routers(model):
        router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.2]))
    batch = random_batch(batch=3, pad_last=3)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    cached = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(cached, model.generate(**inputs, max_new_tokens=10, do_sample=False, use_cache=False))
    length = int(batch["attention_mask"][0].sum())
    alone = model.generate(input_ids=batch["input_ids"][:1, :length], max_new_tokens=10, do_sample=False)
    assert torch.equal(alone[0], cached[0, : alone.shape[1]])


def test_expert_bias_is_saved_and_loaded_bit_exact(tmp_path):
    model = tiny_model(**BIAS)
    for router in _routers(model):
        router.expert_bias.copy_(torch.tensor([0.001, -0.0023, 0.0017, -0.0004]))
    model.save_pretrained(tmp_path)
    loaded = SwitchForConditionalGeneration.from_pretrained(tmp_path)
    for saved, read in zip(_routers(model), _routers(loaded), strict=True):
        assert torch.equal(saved.expert_bias, read.expert_bias)
    assert "step_expert_counts" not in " ".join(loaded.state_dict())


def test_expert_bias_conversion_to_transformers_is_refused_unless_zero(tmp_path):
    model = tiny_model(**BIAS, routing_group="sequence", expert_capacity=4)
    save_as_switch_transformers(model, tmp_path / "zero")  # a zero bias changes no choice
    _routers(model)[0].expert_bias[1] = 0.01
    with pytest.raises(ValueError, match=r"encoder\..*router.expert_bias is not zero: transformers' router has no"):
        save_as_switch_transformers(model, tmp_path / "biased")


class _RecordStepCounts(TrainerCallback):
    """Each router's step counts at the end of every optimizer step, before `SwitchTrainer` turns them into a bias
    step and clears them."""

    def __init__(self, routers):
        self.routers, self.steps = routers, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append([router.step_expert_counts.clone() for router in self.routers])


def test_expert_bias_moves_once_per_optimizer_step_under_the_trainer(tmp_path):
    """Through `SwitchTrainer` alone: one bias step per optimizer step from the counts of all its micro-batches, and
    the dashboard logs the bias spread and the max violation."""
    model = tiny_model(**BIAS, router_bias_update_rate=0.05).train()
    recorder = _RecordStepCounts(_routers(model))
    trainer = accumulating_trainer(model, tmp_path, callbacks=[recorder], logging_steps=1)
    dashboard = add_routing_dashboard(trainer)
    trainer.train()
    assert len(recorder.steps) == 2
    assert [int(counts[0].sum()) for counts in recorder.steps] == [2 * 2 * 6] * 2  # two micro-batches of 2 x 6
    for index, router in enumerate(_routers(model)):
        expected = torch.zeros(4)
        for counts in recorder.steps:
            update_expert_bias(expected, counts[index], 0.05)
        assert expected.any()
        assert torch.equal(router.expert_bias, expected)
        assert not router.step_expert_counts.any()
    assert len(dashboard.history) == 2
    logged = dashboard.history[-1]["layers"]["encoder.1"]
    assert logged["max_violation"] == pytest.approx(logged["load_max_over_mean"] - 1)
    encoder_bias = _routers(model.encoder)[0].expert_bias
    assert logged["expert_bias_spread"] == pytest.approx((encoder_bias.max() - encoder_bias.min()).item())


def test_expert_bias_is_named_on_the_model_card():
    bias_only = tiny_config(**BIAS, router_aux_loss_coef=0)
    assert describe_balancing(bias_only) == (
        "per-expert selection bias (auxiliary-loss-free, step 0.001 per optimizer step)"
    )
    both = tiny_config(**BIAS, router_aux_loss_coef=1e-4, load_balancing_scope="global_batch")
    assert describe_balancing(both).startswith("auxiliary loss over the global batch + per-expert selection bias")
