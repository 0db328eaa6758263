"""LoRA with peft on Switch models: experts included, applied on the routed rows, and no silent no-ops."""

import copy
import json

import pytest
import torch
from conftest import random_batch, tiny_model, write_swap_pairs
from peft import LoraConfig, PeftModel, get_peft_model
from torch.nn.utils import parametrize
from transformers import AutoModelForSeq2SeqLM

from hf_switch.expert_lora import SwitchExpertsLora
from hf_switch.experts import SwitchExperts
from hf_switch.lora import (
    ExpertLoraGradientCheck,
    apply_lora,
    expert_adapters,
    finetune_main,
    load_adapter,
    lora_config,
    register_expert_lora,
)
from hf_switch.prediction import load_for_prediction
from hf_switch.routing import end_balancing_step


def _adapted(model, preset="attention+experts", **options):
    return apply_lora(model, lora_config(preset, model.config, r=4, alpha=8, **options))


def _train_steps(model, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = random_batch()
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        end_balancing_step(model)
    return model.eval()


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_every_sparse_layer_carries_expert_adapters(feed_forward_proj):
    model = _adapted(tiny_model(feed_forward_proj=feed_forward_proj))
    expected = {"wi_0", "wi_1", "wo"} if feed_forward_proj == "gated-gelu" else {"wi", "wo"}
    adapters = expert_adapters(model)
    assert len(adapters) == 2 and all(set(names) == expected for names in adapters.values())


def test_presets_target_what_they_say():
    config = tiny_model().config
    assert set(lora_config("attention", config).target_modules) == {"q", "k", "v", "o"}
    assert set(lora_config("attention+experts", config).target_modules) == {"q", "k", "v", "o", "experts"}
    assert set(lora_config("all-linear", config).target_modules) == {"q", "k", "v", "o", "wi", "wo", "experts"}
    assert lora_config("attention+experts", config, train_router=True).modules_to_save == ["router"]
    with pytest.raises(ValueError, match="lora preset='experts'"):
        lora_config("experts", config)


def test_a_target_that_matches_nothing_is_named():
    with pytest.raises(ValueError, match="'query' matched no module"):
        apply_lora(tiny_model(), LoraConfig(target_modules=["q", "query"], r=2))


def test_only_adapter_parameters_change_and_the_router_stays_frozen():
    model = _adapted(tiny_model())
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    _train_steps(model)
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("experts" in name and "lora_B" in name for name in changed)


@pytest.mark.parametrize("train_router", [False, True])
def test_expert_bias_moves_only_with_a_trained_router_and_the_adapter_reproduces_the_model(train_router, tmp_path):
    # The Trainer closes each step with end_balancing_step; a bias that moved under a frozen router would be lost
    # with the adapter, which holds no router.
    options = dict(router_expert_bias=True, router_bias_update_rate=0.05)
    model = _train_steps(_adapted(tiny_model(**options), train_router=train_router))
    biases = [buffer for name, buffer in model.named_buffers() if name.endswith("expert_bias")]
    assert any(bias.any() for bias in biases) == train_router
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(tiny_model(**options), tmp_path / "adapter")
    batch = random_batch()
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(**batch).logits, model(**batch).logits, atol=1e-6)


def test_disabled_adapter_gives_the_base_output_and_merging_gives_the_adapter_output():
    base = tiny_model()
    batch = random_batch()
    with torch.no_grad():
        base_logits = base(**batch).logits
    model = _train_steps(_adapted(tiny_model()))
    with torch.no_grad():
        adapted_logits = model(**batch).logits
        with model.disable_adapter():
            assert torch.allclose(model(**batch).logits, base_logits, atol=1e-6)
        assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)
        merged = model.merge_and_unload()
        assert (merged(**batch).logits - adapted_logits).abs().max() < 1e-5


def test_adapter_reloads_onto_a_fresh_auto_model(tmp_path):
    model = _train_steps(_adapted(tiny_model()))
    model.save_pretrained(tmp_path / "adapter")
    tiny_model().save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="SwitchExperts"):  # peft alone does not know the expert LoRA layer
        PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    reloaded = load_adapter(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    batch = random_batch()
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(**batch).logits, model(**batch).logits, atol=1e-6)
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (tmp_path / "base" / "model.safetensors").stat().st_size


def test_gradient_check_refuses_expert_adapters_without_gradient():
    model = _adapted(tiny_model())
    check = ExpertLoraGradientCheck()
    check.on_train_begin(None, None, None, model=model)
    with pytest.raises(RuntimeError, match=r"adapter 'default' of .*mlp\.experts\.w[io] received no gradient"):
        check.on_step_end(None, None, None)
    check = ExpertLoraGradientCheck()
    check.on_train_begin(None, None, None, model=model)
    model(**random_batch()).loss.backward()
    check.on_step_end(None, None, None)


def test_finetune_command_saves_adapter_and_merged_model(tmp_path, capsys):
    from hf_switch.training import main as train

    pairs = write_swap_pairs(tmp_path / "pairs.jsonl")
    common = ["--preset", "tiny", "--report_to", "none", "--max_steps", "2", "--eval_strategy", "no"]
    common += ["--objective", "seq2seq", "--train_file", str(pairs), "--per_device_train_batch_size", "8"]
    train([*common, "--output_dir", str(tmp_path / "base"), "--tokenizer_vocab_size", "120"])
    finetune_main(
        [*common, "--model_name_or_path", str(tmp_path / "base"), "--output_dir", str(tmp_path / "lora"), "--merge"]
    )
    summary = capsys.readouterr().out.split("hf-switch finetune: done, 2 steps")[1]
    assert f'AutoModelForSeq2SeqLM.from_pretrained("{tmp_path / "base"}"), "{tmp_path / "lora"}")' in summary
    assert f'# or the merged model: AutoModelForSeq2SeqLM.from_pretrained("{tmp_path / "lora" / "merged"}")' in summary
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert "experts" in config["target_modules"] and config["target_parameters"] is None
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "lora" / "merged")
    assert merged.config.expert_dropout == 0.4
    predictor, tokenizer = load_for_prediction(str(tmp_path / "lora"), device="cpu")  # the adapter folder itself
    batch = tokenizer(
        ["red cat", "small dog house"], text_target=["cat red", "dog small"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        torch.testing.assert_close(predictor(**batch).logits, merged.eval()(**batch).logits, rtol=0, atol=1e-5)


def _with_random_adapters(model, preset="attention+experts", **options):
    """`model` with LoRA (r 4, alpha 8: scale 2) whose B factors are not zero, so they change the output."""
    if preset == "experts":
        lora = register_expert_lora(LoraConfig(target_modules=["experts"], r=4, lora_alpha=8))
    else:
        lora = lora_config(preset, model.config, r=4, alpha=8, **options)
    peft_model = get_peft_model(model, lora)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return peft_model


class _PlusLowRank(torch.nn.Module):
    """The materialised reference: `W + 2 B @ A` for a stacked weight, with autograd through `A` and `B`."""

    def __init__(self, weight_a, weight_b):
        super().__init__()
        self.weight_a, self.weight_b = weight_a, weight_b

    def forward(self, weight):
        return weight + 2.0 * torch.bmm(self.weight_b, self.weight_a)


@pytest.mark.parametrize("layout", ["grouped", "fused_grouped", "padded"])
@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_expert_lora_equals_the_materialised_weights_with_empty_experts_and_dropped_tokens(layout, feed_forward_proj):
    options = dict(feed_forward_proj=feed_forward_proj, num_experts=8, capacity_factor=0.5, min_expert_capacity=1)
    base = tiny_model(**options).train()  # training capacity: factor 0.5 drops tokens
    adapted = _with_random_adapters(copy.deepcopy(base), preset="experts")
    reference = copy.deepcopy(base)
    factors = {}
    for name, module in adapted.named_modules():
        if isinstance(module, SwitchExpertsLora):
            experts = reference.get_submodule(name.removeprefix("base_model.model."))
            for weight in module.lora_A["default"]:
                pair = [module.lora_A["default"][weight], module.lora_B["default"][weight]]
                copies = [factor.detach().clone().requires_grad_() for factor in pair]
                parametrize.register_parametrization(experts, weight, _PlusLowRank(*copies))
                factors[f"{name}.{weight}"] = (pair, copies)
    sizes = []
    for model in (adapted, reference):
        for module in model.modules():
            if isinstance(module, SwitchExperts):
                module.layout = layout
                module.register_forward_hook(lambda m, inputs, output: sizes.append(inputs[1].tokens_per_expert))
    batch = random_batch()
    outputs, expected = adapted(**batch), reference(**batch)
    assert any((size == 0).any() for size in sizes), "some expert must receive no token"
    assert any(size.sum() < 3 * 11 for size in sizes), "some tokens must be dropped"
    torch.testing.assert_close(outputs.logits, expected.logits, rtol=0, atol=1e-5)
    outputs.loss.backward()
    expected.loss.backward()
    for name, (pair, copies) in factors.items():
        for factor, copied in zip(pair, copies, strict=True):
            torch.testing.assert_close(factor.grad, copied.grad, rtol=0, atol=1e-5, msg=name)


def test_lora_dropout_acts_in_training_only():
    model = _with_random_adapters(tiny_model(), dropout=0.5)
    without_dropout = _with_random_adapters(tiny_model())
    without_dropout.load_state_dict(model.state_dict())
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, without_dropout.eval()(**batch).logits)
        model.train()
        assert not torch.allclose(model(**batch).logits, model(**batch).logits)


def test_named_adapters_switch_with_set_adapter_and_load_beside_each_other(tmp_path):
    base = tiny_model()
    first, second = (_train_steps(_with_random_adapters(copy.deepcopy(base))) for _ in range(2))
    second.base_model.model.load_state_dict(first.base_model.model.state_dict())  # the same base weights
    with torch.no_grad():
        for name, parameter in second.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    batch = random_batch()
    with torch.no_grad():
        expected = {"first": first(**batch).logits, "second": second(**batch).logits}
    model = load_adapter(copy.deepcopy(base), tmp_path / "first", adapter_name="first")
    model = load_adapter(model, tmp_path / "second", adapter_name="second")
    with torch.no_grad():
        for name in ("first", "second", "first"):
            model.set_adapter(name)
            torch.testing.assert_close(model(**batch).logits, expected[name], rtol=0, atol=1e-6)


def test_adapters_of_the_parameter_path_are_converted_on_load(tmp_path, caplog):
    base = tiny_model(feed_forward_proj="gated-gelu")
    base.save_pretrained(tmp_path / "base")
    targets = ["experts.wi_0", "experts.wi_1", "experts.wo"]
    old = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["q", "v"], target_parameters=targets, r=4))
    for name, parameter in old.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    old.save_pretrained(tmp_path / "old")
    loaded = load_adapter(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base"), tmp_path / "old")
    assert "converted to hf_switch's expert LoRA layer" in caplog.text
    assert all(weights == ["wi_0", "wi_1", "wo"] for weights in expert_adapters(loaded).values())
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, old.eval()(**batch).logits, rtol=0, atol=1e-5)


def test_transformers_expert_kernels_refuse_expert_adapters():
    model = _with_random_adapters(tiny_model())
    model.base_model.model.set_experts_implementation("batched_mm")
    with pytest.raises(ValueError, match="experts_implementation='batched_mm'.*cannot apply LoRA"):
        model(**random_batch())


def test_expert_adapters_train_under_bfloat16_autocast_with_float32_gradients():
    model = _with_random_adapters(tiny_model())
    for module in model.modules():
        if isinstance(module, SwitchExperts):
            module.layout = "padded"  # the layout whose products autocast would otherwise leave mixed
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.train()(**random_batch()).loss
    loss.backward()
    factors = [p for name, p in model.named_parameters() if "experts" in name and "lora_" in name]
    assert factors and all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in factors)
