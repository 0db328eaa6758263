"""transformers' experts interface: `from_pretrained(..., experts_implementation=...)` and
`set_experts_implementation` select transformers' `batched_mm` / `grouped_mm` kernels, which compute what
hf_switch's own kernels ("eager") compute, dropped tokens and top-k weights included; other names are refused."""

import pytest
import torch
from conftest import random_batch, tiny_config, tiny_model

from hf_switch import SwitchForConditionalGeneration
from hf_switch.experts import check_experts_implementation

IMPLEMENTATIONS = ["batched_mm", "grouped_mm"]
# (config, whether its capacity drops some of the batch's tokens)
CONFIGS = {
    "top-1, capacity drops tokens": (dict(expert_capacity=2), True),
    "top-2, gated-gelu, dropless": (dict(router_top_k=2, feed_forward_proj="gated-gelu", expert_capacity=None), False),
    "every layer sparse, capacity factor": (
        dict(num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, capacity_factor=1.0, eval_capacity_factor=1.0),
        True,
    ),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("overrides, drops", CONFIGS.values(), ids=CONFIGS.keys())
def test_a_loaded_model_gives_the_eager_logits(implementation, overrides, drops, tmp_path):
    model = tiny_model(**overrides)
    model.save_pretrained(tmp_path)
    batch = random_batch(pad_last=3)
    with torch.no_grad():
        expected = model(**batch)
        loaded = SwitchForConditionalGeneration.from_pretrained(tmp_path, experts_implementation=implementation)
        output = loaded.eval()(**batch)
    assert loaded.config._experts_implementation == implementation
    assert model.config._experts_implementation == "eager"
    assert (output.logits - expected.logits).abs().max() < 1e-5
    routed = 3 * 11 - 3  # tokens of the batch that are not padding
    kept = [counts.sum().item() for counts in expected.encoder_expert_counts]
    assert any(count < routed * overrides.get("router_top_k", 1) for count in kept) == drops


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_training_gives_the_eager_loss_and_every_gradient(implementation):
    overrides = dict(router_top_k=2, capacity_factor=1.0, router_z_loss_coef=0.1, router_aux_loss_coef=0.1)
    batch = random_batch()
    runs = {}
    for name in ("eager", implementation):
        model = tiny_model(**overrides).train()
        model.set_experts_implementation(name)
        loss = model(**batch).loss
        loss.backward()
        runs[name] = loss.item(), {key: parameter.grad for key, parameter in model.named_parameters()}
    (eager_loss, eager), (loss, gradients) = runs["eager"], runs[implementation]
    assert loss == pytest.approx(eager_loss, abs=1e-6)
    for key, gradient in eager.items():
        assert (gradients[key] - gradient).abs().max() < 1e-5, key


def test_set_experts_implementation_reaches_both_stacks_and_generation_matches():
    model = tiny_model(expert_capacity=3)
    batch = random_batch()
    expected = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6)
    model.set_experts_implementation("grouped_mm")
    sparse_layers = [module for module in model.modules() if hasattr(module, "router")]
    assert len(sparse_layers) == 2 and {layer.config._experts_implementation for layer in sparse_layers} == {
        "grouped_mm"
    }
    generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6)
    assert torch.equal(generated, expected)
    model.set_experts_implementation("eager")
    assert {layer.config._experts_implementation for layer in sparse_layers} == {"eager"}


@pytest.mark.parametrize(
    "name, message",
    [
        ("sonicmoe", "'sonicmoe' is a CUDA kernel of transformers not verified with Switch experts"),
        ("deepgemm", "'deepgemm' is a CUDA kernel"),
        ("fast", "'fast' is not an experts implementation a Switch model can run"),
    ],
)
def test_other_implementations_are_refused_by_name(name, message, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        SwitchForConditionalGeneration.from_pretrained(tmp_path, experts_implementation=name)
    with pytest.raises(ValueError, match="choose 'eager'"):
        tiny_model().set_experts_implementation(name)


def test_transformers_kernels_are_refused_under_expert_parallelism():
    with pytest.raises(ValueError, match="expert_parallel_size=2 spreads them over ranks"):
        check_experts_implementation("grouped_mm", tiny_config(expert_parallel_size=2))
