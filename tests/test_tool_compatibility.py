"""Tools that act on modules see the router's projection: forward hooks, peft LoRA, accelerate's offloading, a
dtype given to `from_pretrained`. Each compares with the model in memory, untouched."""

import accelerate
import pytest
import torch
from conftest import random_batch, tiny_model
from peft import LoraConfig, get_peft_model

from hf_switch import SwitchEncoderModel, SwitchForConditionalGeneration, SwitchModel
from hf_switch.routing import SwitchRouter


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_a_forward_hook_on_the_router_projection_fires_and_steers_routing():
    model = tiny_model(num_experts=4)
    router = next(module for module in model.encoder.modules() if isinstance(module, SwitchRouter))
    calls = []

    def prefer_expert_2(module, inputs, logits):
        calls.append(logits.shape)
        return logits + torch.tensor([0.0, 0.0, 100.0, 0.0])

    batch = random_batch()
    router.classifier.register_forward_hook(prefer_expert_2)
    with torch.no_grad():
        output = model(**batch)
    assert calls == [(3, 11, 4)]
    assert output.encoder_expert_counts[0].tolist() == [0, 0, 33, 0]


def test_lora_on_the_router_changes_routing_and_merges_to_the_adapter_model():
    base = tiny_model(num_experts=4)
    batch = random_batch()
    before = _logits(base, batch)
    adapted = get_peft_model(base, LoraConfig(target_modules=["classifier"], r=2, init_lora_weights=False)).eval()
    with_adapter = _logits(adapted, batch)
    assert (with_adapter - before).abs().max() > 1e-3
    merged = adapted.merge_and_unload()
    assert (_logits(merged, batch) - with_adapter).abs().max() < 1e-5


@pytest.fixture
def saved_model(tmp_path):
    model = tiny_model(num_experts=4, num_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_cpu_offloaded_model_gives_the_in_memory_logits(saved_model):
    model, folder = saved_model
    batch = random_batch()
    offloaded = SwitchForConditionalGeneration.from_pretrained(folder).eval()
    accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert (_logits(offloaded, batch) - _logits(model, batch)).abs().max() < 1e-5


def test_loading_under_a_memory_budget_with_disk_offload_gives_the_in_memory_logits_and_generates(
    saved_model, tmp_path
):
    model, folder = saved_model
    size = accelerate.utils.compute_module_sizes(model)[""]
    loaded = SwitchForConditionalGeneration.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": size // 3}, offload_folder=tmp_path / "offload"
    ).eval()
    assert "disk" in set(loaded.hf_device_map.values())
    batch = random_batch()
    assert (_logits(loaded, batch) - _logits(model, batch)).abs().max() < 1e-5
    options = dict(input_ids=batch["input_ids"], max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(**options), model.generate(**options))


def test_a_bfloat16_load_keeps_the_routers_in_float32(saved_model):
    _, folder = saved_model
    loaded = SwitchForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    routers = [module for module in loaded.modules() if isinstance(module, SwitchRouter)]
    assert all(router.classifier.weight.dtype == torch.float32 for router in routers)
    assert loaded.shared.weight.dtype == torch.bfloat16


def _loss_and_gradients(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    output = model(**batch)
    output.loss.backward()
    return output.loss.item(), {name: parameter.grad for name, parameter in model.named_parameters()}


@pytest.mark.parametrize(
    "enable",
    [
        lambda model: model.activation_checkpointing_enable(),
        lambda model: model.activation_checkpointing_enable({"use_reentrant": True}),
        lambda model: model.activation_checkpointing_enable({"use_reentrant": True}, every_n_layers=2),
        lambda model: model.gradient_checkpointing_enable({"use_reentrant": True}),  # the deprecated name
        pytest.param(
            lambda model: model.activation_checkpointing_enable(offload=True),
            marks=pytest.mark.skipif(
                not torch.accelerator.is_available(), reason="offload pins host memory, which needs an accelerator"
            ),
        ),
    ],
    ids=["default", "reentrant", "reentrant-every-2nd-layer", "gradient_checkpointing_enable", "offload"],
)
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_activation_checkpointing_gives_the_loss_and_every_gradient_of_the_plain_model(enable):
    config = dict(num_experts=4, num_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)
    config.update(router_z_loss_coef=0.1, router_aux_loss_coef=0.1)  # large enough to move the router's gradient
    batch = random_batch()
    plain_loss, plain = _loss_and_gradients(tiny_model(**config), batch)
    checkpointed_model = tiny_model(**config)
    enable(checkpointed_model)
    loss, gradients = _loss_and_gradients(checkpointed_model, batch)
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    for name, gradient in plain.items():
        assert (gradients[name] - gradient).abs().max() < 1e-6, name


def test_a_compiled_training_step_gives_the_loss_and_every_gradient_of_eager():
    """`torch.compile` runs the training step (with graph breaks at the data-dependent dispatch: docs/reliability.md)
    and computes what eager does, router losses included. The `aot_eager` backend traces the forward and backward
    graphs as inductor does but runs them with eager kernels: what is checked is the model's compatibility with
    Dynamo and AOTAutograd, not inductor's code generation (a C++ compiler, and minutes on CI's two cores)."""
    config = dict(num_experts=4, router_z_loss_coef=0.1, router_aux_loss_coef=0.1)
    batch = random_batch()
    eager_loss, eager = _loss_and_gradients(tiny_model(**config).train(), batch)
    compiled = torch.compile(tiny_model(**config).train(), backend="aot_eager")
    loss, gradients = _loss_and_gradients(compiled, batch)
    gradients = {name.removeprefix("_orig_mod."): gradient for name, gradient in gradients.items()}
    assert loss == pytest.approx(eager_loss, abs=1e-6)
    assert gradients.keys() == eager.keys()
    for name, gradient in eager.items():
        assert (gradients[name] - gradient).abs().max() < 1e-6, name


class _Logits(torch.nn.Module):
    """The model's eval forward with positional tensor inputs and the logits as output, as torch.export takes it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
        ).logits


def _export(model, batch):
    batch_size, source, target = (torch.export.Dim(name, max=512) for name in ("batch", "source", "target"))
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    dynamic = ({0: batch_size, 1: source}, {0: batch_size, 1: source}, {0: batch_size, 1: target})
    return torch.export.export(_Logits(model), inputs, dynamic_shapes=dynamic, strict=False)


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_export_with_transformers_expert_kernels_gives_the_eager_logits_at_other_shapes(implementation):
    model = tiny_model(num_experts=4).eval()  # dropless evaluation, the default
    model.set_experts_implementation(implementation)
    exported = _export(model, random_batch())
    other = random_batch(batch=5, source=17, target=6, seed=3, pad_last=4)
    arguments = (other["input_ids"], other["attention_mask"], other["labels"])
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*arguments), _Logits(model)(*arguments), rtol=0, atol=1e-6)
    outside = other["input_ids"].clone()
    outside[0, 0] = model.config.vocab_size  # the input check survives export as a runtime assertion (torch's words)
    with pytest.raises(RuntimeError, match="Runtime assertion failed"):
        exported.module()(outside, other["attention_mask"], other["labels"])


def test_export_with_hf_switchs_own_kernels_names_the_implementations_that_export():
    with pytest.raises(ValueError, match=r"experts_implementation='eager'.*set_experts_implementation\('batched_mm'\)"):
        _export(tiny_model(num_experts=4).eval(), random_batch())


@pytest.mark.parametrize(
    ("new_size", "pad_to_multiple_of", "tied"), [(74, None, True), (74, 8, False), (60, None, True)]
)
def test_a_resized_vocabulary_trains_on_its_new_ids_and_survives_save_and_load(
    new_size, pad_to_multiple_of, tied, tmp_path
):
    model = tiny_model(tie_word_embeddings=tied)
    model.resize_token_embeddings(new_size, pad_to_multiple_of=pad_to_multiple_of)
    size = model.get_input_embeddings().num_embeddings
    assert size == (80 if pad_to_multiple_of else new_size)
    batch = {name: ids % size for name, ids in random_batch().items()}
    batch["input_ids"][0, 0] = batch["labels"][0, 0] = size - 1  # a new id when growing, the last one left when not
    model.train()(**batch).loss.backward()
    assert model.encoder.embed_tokens.weight.grad[size - 1].abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = SwitchForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded, batch), _logits(model.eval(), batch))
    batch["input_ids"][0, 0] = size
    with pytest.raises(ValueError, match=f"input_ids: token id {size} is outside the vocabulary"):
        loaded(**batch)


@pytest.mark.parametrize("model_class", [SwitchEncoderModel, SwitchModel, SwitchForConditionalGeneration])
def test_tuple_outputs_hold_tensors_only_and_trace(model_class):
    config = tiny_model().config
    config.return_dict, config.use_cache = False, False  # what tracing tools set
    model = model_class(config).eval()
    batch = random_batch()
    inputs = (batch["input_ids"], batch["attention_mask"])
    if model_class is not SwitchEncoderModel:
        inputs += (batch["labels"],)  # decoder_input_ids, the third positional argument
    with torch.no_grad():
        as_tuple = model(*inputs)
        assert isinstance(as_tuple, tuple) and all(isinstance(value, torch.Tensor) for value in as_tuple)
        traced = torch.jit.trace(model, inputs, strict=False, check_trace=False)
        assert torch.allclose(traced(*inputs)[0], as_tuple[0], atol=1e-5)


def test_attention_weights_come_from_eager_attention_and_sdpa_refuses_to_return_empty_tuples():
    model = tiny_model()
    batch = random_batch()
    with pytest.raises(ValueError, match="output_attentions=True: attn_implementation='sdpa' computes no attention"):
        model(**batch, output_attentions=True)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        output = model(**batch, output_attentions=True)
    assert len(output.encoder_attentions) == 2 and output.encoder_attentions[0].shape == (3, 2, 11, 11)
    assert len(output.cross_attentions) == 2 and output.cross_attentions[0].shape == (3, 2, 9, 11)


@pytest.mark.parametrize("model_class", [SwitchEncoderModel, SwitchModel, SwitchForConditionalGeneration, "stack"])
def test_every_public_forward_takes_transformers_keywords_and_refuses_what_it_would_ignore(model_class):
    model = tiny_model() if model_class == "stack" else model_class(tiny_model().config)
    model.set_attn_implementation("eager")
    forward = model.encoder if model_class == "stack" else model
    batch = random_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if model_class in (SwitchModel, SwitchForConditionalGeneration):
        inputs.update(decoder_input_ids=batch["labels"], use_cache=True, past_key_values=None)
    standard = dict(output_attentions=True, output_hidden_states=True, output_router_logits=True, return_dict=True)
    with torch.no_grad():
        forward(**inputs, **standard)
        forward(**inputs, output_routing_stats=False)
        with pytest.raises(
            TypeError, match=r"forward\(\) got (keyword arguments it does not use: |an unexpected .*)colour"
        ):
            forward(**inputs, colour="red", position_ids=torch.arange(11))
