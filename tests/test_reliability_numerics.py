"""Reliability battery, numerics: seeded training is bit-reproducible, and the float32 router of a bfloat16 model
("selective precision", section 2.4 of the paper) routes correctly where an all-bfloat16 router does not.

Resuming from a checkpoint reproduces the uninterrupted run bit for bit:
tests/test_training.py::test_resume_from_checkpoint_reproduces_the_uninterrupted_losses.
"""

import json

import pytest
import torch
from conftest import random_batch, tiny_config, tiny_model
from test_training import TINY

from hf_switch.experts import SwitchExperts
from hf_switch.routing import SwitchRouter, load_balancing_loss
from hf_switch.training import main
from hf_switch.training.data import embedded_corpus, train_tokenizer


def _losses(output_dir) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_the_same_seed_gives_bit_identical_training_losses(tmp_path):
    texts = embedded_corpus()[:120]
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(texts))
    # One tokenizer for both runs: `tokenizers`' Unigram trainer is not deterministic (the order of equally scored
    # pieces, hence their ids, changes from call to call), so a tokenizer trained per run would differ.
    train_tokenizer(texts, 300).save_pretrained(tmp_path / "tokenizer")
    arguments = [*TINY, "--train_file", str(text_file), "--max_source_length", "24", "--max_steps", "3"]
    arguments += ["--eval_strategy", "no", "--tokenizer_name_or_path", str(tmp_path / "tokenizer"), "--seed", "7"]
    # Jitter noise and dropout are on, so the seed has to reach every random draw.
    arguments += ["--config_overrides", "router_jitter_noise=0.1,dropout_rate=0.1"]
    first, second = tmp_path / "first", tmp_path / "second"
    main([*arguments, "--output_dir", str(first)])
    main([*arguments, "--output_dir", str(second)])
    assert len(_losses(first)) == 3
    assert _losses(first) == _losses(second)


def _stress_router(router_dtype: str, num_experts=4, d_model=16) -> SwitchRouter:
    """A router, held in bfloat16, whose logits are `3000 + x_e`: a large shared part and small differences.

    Large shared logits are what an unconstrained router drifts to (the z-loss exists to prevent it). bfloat16 keeps
    8 significant bits, so near 3000 it rounds to multiples of 16 and every expert ties; float32 resolves 2e-4.
    """
    router = SwitchRouter(tiny_config(router_dtype=router_dtype, num_experts=num_experts)).eval()
    weight = torch.zeros(num_experts, d_model)
    weight[:, 0] = 1.0
    weight[torch.arange(num_experts), 1 + torch.arange(num_experts)] = 1.0
    router.classifier.weight.data = weight
    return router.to(torch.bfloat16)


def _stress_hidden_states(tokens=512, num_experts=4, d_model=16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.zeros(1, tokens, d_model)
    hidden[..., 0] = 3000.0
    hidden[..., 1 : 1 + num_experts] = 2 * torch.rand(1, tokens, num_experts, generator=generator)
    return hidden.to(torch.bfloat16)  # what a bfloat16 model hands its router


def _routing_accuracy(router: SwitchRouter, hidden: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Share of tokens sent to an expert of highest float64 logit (exact ties all count), and the decision."""
    decision = router(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool))
    reference = hidden.double() @ router.classifier.weight.double().T
    chosen = reference.gather(-1, decision.expert_index[..., :1]).squeeze(-1)
    return (chosen == reference.amax(-1)).double().mean().item(), decision


def test_float32_router_routes_exactly_where_a_bfloat16_router_collapses():
    hidden = _stress_hidden_states()
    accuracy_fp32, decision_fp32 = _routing_accuracy(_stress_router("float32"), hidden)
    accuracy_bf16, decision_bf16 = _routing_accuracy(_stress_router("bfloat16"), hidden)

    assert decision_fp32.logits.dtype == torch.float32 and decision_bf16.logits.dtype == torch.bfloat16
    assert accuracy_fp32 == 1.0
    # Every bfloat16 logit rounds to the same value: the choice is a tie-break, right only by chance (~1 in 4).
    assert (decision_bf16.logits == decision_bf16.logits[..., :1]).all()
    assert accuracy_bf16 < 0.4
    # ... and every token goes to the one expert that wins the tie: the load collapses (a quarter each is balanced).
    # The load-balancing loss cannot see it: with tied probabilities `P_e = 1/E`, it is 1 whatever the load.
    share_fp32 = decision_fp32.expert_index.flatten().bincount(minlength=4).max().item() / hidden.shape[1]
    share_bf16 = decision_bf16.expert_index.flatten().bincount(minlength=4).max().item() / hidden.shape[1]
    assert share_fp32 < 0.3 and share_bf16 == 1.0
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
    assert load_balancing_loss(decision_bf16.probs, decision_bf16.expert_index, mask).item() == pytest.approx(1.0)


def test_a_float32_router_stays_float32_under_autocast():
    """Trainer's `--bf16` (and `--fp16`) trains a float32 model under `torch.autocast`, which would run the router's
    projection in bfloat16 like any linear layer: the router opts out, and routes as in float32."""
    hidden = _stress_hidden_states().float()
    router = _stress_router("float32").float()
    expected_accuracy, expected = _routing_accuracy(router, hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        accuracy, decision = _routing_accuracy(router, hidden)
    assert decision.logits.dtype == torch.float32 and decision.probs.dtype == torch.float32
    assert accuracy == expected_accuracy == 1.0
    assert torch.equal(decision.expert_index, expected.expert_index)


def test_a_model_cast_to_bfloat16_routes_in_float32_trains_finite_and_keeps_its_parameters_as_cast():
    # The router computes in float32 inside a bfloat16 model (tests/test_training_signals.py checks one forward); here
    # a few optimiser steps with the router losses on stay finite and train the router, whose weights stay the
    # bfloat16 tensors the cast made (converting them in the forward would swap parameters under FSDP2 or an optimizer).
    model = tiny_model(router_z_loss_coef=1e-2).to(torch.bfloat16).train()
    router = model.encoder.block[1].layer[-1].mlp.router
    weight, initial = router.classifier.weight, router.classifier.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(5):
        output = model(**random_batch(seed=step), output_router_logits=True)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(output.loss), step
        assert all(logits.dtype == torch.float32 for logits in output.encoder_router_logits)
    assert router.classifier.weight is weight and weight.dtype == torch.bfloat16
    assert torch.isfinite(weight).all() and not torch.equal(weight, initial)
    assert model.encoder.block[0].layer[-1].mlp.wi.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["grouped", "fused_grouped", "padded"])
def test_a_training_step_under_bfloat16_autocast_runs_the_experts_in_bfloat16(layout):
    """Trainer's `--bf16` on a float32 model: a training step under autocast runs the expert products in bfloat16,
    gives every float32 parameter a float32 gradient, and stays close to the float32 step."""
    batch = random_batch()
    reference = tiny_model(num_experts=4).train()
    reference(**batch).loss.backward()
    model = tiny_model(num_experts=4).train()
    experts = [module for module in model.modules() if isinstance(module, SwitchExperts)]
    dtypes = []
    for module in experts:
        module.layout = layout
        module.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert loss.item() == pytest.approx(reference(**batch).loss.item(), rel=2e-2)
    for (name, parameter), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name
        assert torch.allclose(parameter.grad, expected.grad, rtol=0.1, atol=2e-2), name
