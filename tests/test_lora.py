"""LoRA with peft on Switch models: experts included, and no silent no-ops."""

import json

import pytest
import torch
from conftest import random_batch, tiny_model
from peft import LoraConfig, PeftModel
from transformers import AutoModelForSeq2SeqLM

from hf_switch.lora import ExpertLoraGradientCheck, apply_lora, expert_adapters, finetune_main, lora_config


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
    return model.eval()


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_every_sparse_layer_carries_expert_adapters(feed_forward_proj):
    model = _adapted(tiny_model(feed_forward_proj=feed_forward_proj))
    expected = {"wi_0", "wi_1", "wo"} if feed_forward_proj == "gated-gelu" else {"wi", "wo"}
    adapters = expert_adapters(model)
    assert len(adapters) == 2 and all(set(names) == expected for names in adapters.values())


def test_presets_target_what_they_say():
    config = tiny_model().config
    assert lora_config("attention", config).target_parameters is None
    assert set(lora_config("all-linear", config).target_modules) == {"q", "k", "v", "o", "wi", "wo"}
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
    reloaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    batch = random_batch()
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(**batch).logits, model(**batch).logits, atol=1e-6)
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (tmp_path / "base" / "model.safetensors").stat().st_size


def test_gradient_check_refuses_expert_adapters_without_gradient():
    model = _adapted(tiny_model())
    check = ExpertLoraGradientCheck()
    with pytest.raises(RuntimeError, match=r"mlp\.experts\.w[io] received no gradient"):
        check.on_pre_optimizer_step(None, None, None, model=model)
    model(**random_batch()).loss.backward()
    ExpertLoraGradientCheck().on_pre_optimizer_step(None, None, None, model=model)


def test_finetune_command_saves_adapter_and_merged_model(tmp_path, capsys):
    from hf_switch.training import main as train

    pairs = tmp_path / "pairs.jsonl"
    words = "red green blue small large cat dog house".split()
    pairs.write_text("\n".join(json.dumps({"source": f"{a} {b}", "target": f"{b} {a}"}) for a in words for b in words))
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
    assert set(config["target_parameters"]) == {"experts.wi", "experts.wo"}
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "lora" / "merged")
    assert merged.config.expert_dropout == 0.4
