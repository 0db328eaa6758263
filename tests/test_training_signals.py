"""Gradients, loss normalisation and train-only noise."""

import pytest
import torch
from conftest import random_batch, tiny_model

from hf_switch.modeling_switch import SwitchSparseMLP


def _sparse_layers(model):
    return [module for module in model.modules() if isinstance(module, SwitchSparseMLP)]


def test_gradients_reach_the_router_and_exactly_the_experts_that_received_tokens():
    model = tiny_model(num_experts=8, expert_capacity=2).train()
    output = model(**random_batch(batch=1, source=6, target=5))
    output.loss.backward()
    counts = torch.cat([output.encoder_expert_counts, output.decoder_expert_counts])
    for layer, layer_counts in zip(_sparse_layers(model), counts, strict=True):
        assert layer.router.classifier.weight.grad.abs().sum() > 0
        grad_per_expert = layer.experts.wi.grad.abs().sum(dim=(1, 2)) + layer.experts.wo.grad.abs().sum(dim=(1, 2))
        assert torch.equal(grad_per_expert > 0, layer_counts > 0), (grad_per_expert, layer_counts)
    assert (counts == 0).any(), "the case should leave some expert without tokens"


def test_loss_is_cross_entropy_plus_weighted_router_losses():
    model = tiny_model(router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    batch = random_batch()
    output = model(**batch)
    cross_entropy = torch.nn.functional.cross_entropy(output.logits.flatten(0, 1), batch["labels"].flatten())
    router = 0.5 * (output.encoder_aux_loss + output.decoder_aux_loss)
    router = router + 0.25 * (output.encoder_z_loss + output.decoder_z_loss)
    assert output.loss.item() == pytest.approx((cross_entropy + router).item(), rel=1e-6)
    assert output.router_loss.item() == pytest.approx(router.item(), rel=1e-6)


@pytest.mark.parametrize("predict_with_generate", [False, True])
def test_evaluation_reports_the_cross_entropy_as_loss_and_the_router_losses_beside_it(tmp_path, predict_with_generate):
    from transformers import Seq2SeqTrainingArguments

    from hf_switch.training import SwitchTrainer

    model = tiny_model(router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    batch = random_batch(batch=4)
    rows = [{name: tensor[row] for name, tensor in batch.items() if name != "attention_mask"} for row in range(4)]
    settings = dict(per_device_eval_batch_size=2, report_to=[], use_cpu=True, disable_tqdm=True)
    arguments = Seq2SeqTrainingArguments(
        tmp_path, predict_with_generate=predict_with_generate, generation_max_length=4, **settings
    )
    metrics = SwitchTrainer(model=model, args=arguments, eval_dataset=rows).evaluate()
    cross_entropies, router_losses = [], []
    with torch.no_grad():
        for half in (slice(0, 2), slice(2, 4)):
            output = model(**{name: tensor[half] for name, tensor in batch.items()})
            labels = batch["labels"][half]
            cross_entropies.append(torch.nn.functional.cross_entropy(output.logits.flatten(0, 1), labels.flatten()))
            router_losses.append(output.loss - cross_entropies[-1])
    assert metrics["eval_loss"] == pytest.approx(torch.stack(cross_entropies).mean().item(), rel=1e-5)
    assert metrics["eval_router_loss"] == pytest.approx(torch.stack(router_losses).mean().item(), rel=1e-5)
    assert metrics["eval_router_loss"] > 0.1  # large coefficients: the two losses are far apart


def test_num_items_in_batch_makes_accumulated_micro_batches_average_like_one_batch():
    model = tiny_model(router_aux_loss_coef=1.0, router_z_loss_coef=1.0)
    batch = random_batch(batch=4)
    batch["labels"][0, 5:] = -100
    batch["labels"][3, 2:] = -100
    num_items = (batch["labels"] != -100).sum()
    micro = [{key: value[rows] for key, value in batch.items()} for rows in (slice(0, 2), slice(2, 4))]
    accumulated = sum(model(**part, num_items_in_batch=num_items).loss for part in micro)

    expected = 0.0
    for part in micro:
        output = model(**part)
        cross_entropy = torch.nn.functional.cross_entropy(
            output.logits.flatten(0, 1), part["labels"].flatten(), ignore_index=-100, reduction="sum"
        )
        router = output.encoder_aux_loss + output.decoder_aux_loss + output.encoder_z_loss + output.decoder_z_loss
        share = (part["labels"] != -100).sum() / num_items
        expected = expected + cross_entropy / num_items + router * share
    assert accumulated.item() == pytest.approx(expected.item(), rel=1e-6)
    # One batch: the same cross-entropy, and router losses that average rather than add up over micro-batches.
    whole = model(**batch, num_items_in_batch=num_items)
    whole_router = whole.encoder_aux_loss + whole.decoder_aux_loss + whole.encoder_z_loss + whole.decoder_z_loss
    # Adding the micro-batches' router losses unweighted would overshoot by about one whole router loss.
    assert abs(accumulated.item() - whole.loss.item()) < 0.1 * whole_router.item()


def test_jitter_and_expert_dropout_act_only_in_training():
    model = tiny_model(router_jitter_noise=0.5, expert_dropout=0.5, capacity_factor=None, eval_capacity_factor=None)
    batch = random_batch()
    with torch.no_grad():
        first, second = model(**batch).logits, model(**batch).logits
        assert torch.equal(first, second)
        model.train()
        torch.manual_seed(0)
        noisy = model(**batch).logits
    assert not torch.equal(first, noisy)
    experts = _sparse_layers(model)[0].experts
    assert experts.dropout.p == 0.5 and model.config.dropout_rate == 0.0


def test_router_runs_in_float32_inside_a_bfloat16_model():
    model = tiny_model().to(torch.bfloat16)
    output = model(**random_batch(), output_router_logits=True)
    assert output.encoder_router_logits[0].dtype == torch.float32
    assert output.logits.dtype == torch.bfloat16
    assert torch.isfinite(output.loss)


def test_out_of_vocabulary_ids_are_named():
    model = tiny_model()
    batch = random_batch()
    batch["input_ids"][1, 3] = 64
    with pytest.raises(ValueError, match="token id 64 is outside the vocabulary"):
        model(**batch)


def test_ignored_target_padding_leaves_the_loss_alone_and_is_not_routed():
    batch = random_batch(batch=2)
    batch["labels"][0, 4:] = -100
    dropless = dict(num_experts=2, capacity_factor=None, eval_capacity_factor=None)
    routed_padding = tiny_model(**dropless)(**batch)
    ignored_padding = tiny_model(**dropless, router_ignore_padding_tokens=True)(**batch)
    real = batch["labels"] != -100
    assert torch.allclose(ignored_padding.logits[real], routed_padding.logits[real], atol=1e-6)
    assert ignored_padding.loss.item() != routed_padding.loss.item()  # the router losses leave padding out
    assert ignored_padding.decoder_expert_counts.sum() == real.sum() < routed_padding.decoder_expert_counts.sum()
