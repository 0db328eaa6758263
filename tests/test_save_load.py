"""save_pretrained / from_pretrained round trips, the Auto classes, and the remote-code folder."""

import json
import subprocess
import sys

import torch
from conftest import random_batch, tiny_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from hf_switch import SwitchConfig, SwitchForConditionalGeneration, SwitchModel


def test_save_and_load_round_trip_bit_exactly_with_stacked_experts(tmp_path):
    model = tiny_model(feed_forward_proj="gated-gelu", router_bias=True, tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as checkpoint:
        keys = set(checkpoint.keys())
    assert "encoder.block.1.layer.1.mlp.experts.wi_0" in keys
    assert not any(".expert_0." in key for key in keys)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert isinstance(loaded, SwitchForConditionalGeneration)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[key], reloaded[key]) for key in original)
    assert not torch.equal(loaded.lm_head.weight, loaded.shared.weight)


def test_a_nonzero_rank_leaves_rank_zeros_folder_as_it_is(tmp_path, monkeypatch):
    """transformers writes only on global rank 0, whatever `is_main_process` says; the atomic save must not then
    swap rank 1's empty staging folder over the one rank 0 wrote (a DDP job calling `save_pretrained(folder)` on
    every rank lost its weights that way)."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    written = sorted(path.name for path in tmp_path.iterdir())
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    model.save_pretrained(tmp_path, is_main_process=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == written
    assert SwitchForConditionalGeneration.from_pretrained(tmp_path)


def test_auto_classes_are_registered(tmp_path):
    config = tiny_model().config
    assert isinstance(AutoModel.from_config(config), SwitchModel)
    assert isinstance(AutoModelForSeq2SeqLM.from_config(config), SwitchForConditionalGeneration)
    assert AutoConfig.for_model("hf_switch").__class__ is SwitchConfig


def test_base_model_output_matches_the_lm_models_decoder_state(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path).eval()
    batch = random_batch()
    with torch.no_grad():
        hidden = base(input_ids=batch["input_ids"], decoder_input_ids=batch["labels"]).last_hidden_state
        logits = model(input_ids=batch["input_ids"], decoder_input_ids=batch["labels"]).logits
    assert torch.allclose(model.lm_head(hidden * model.config.d_model**-0.5), logits, atol=1e-6)


REMOTE_LOAD = """
import sys, torch
sys.modules["hf_switch"] = None  # hf_switch must not be importable
from transformers import AutoModelForSeq2SeqLM
model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
batch = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(**batch).logits, sys.argv[3])
"""


def test_remote_code_folder_loads_in_a_fresh_process_without_hf_switch(tmp_path):
    model = tiny_model(expert_capacity=2)
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForSeq2SeqLM")
    try:
        model.save_pretrained(tmp_path / "model")
    finally:
        SwitchConfig._auto_class = None
        SwitchForConditionalGeneration._auto_class = None
    auto_map = json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSeq2SeqLM"] == "modeling_switch.SwitchForConditionalGeneration"
    batch = random_batch(pad_last=2)
    torch.save(batch, tmp_path / "batch.pt")
    subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(tmp_path / "model"), str(tmp_path / "batch.pt"), str(tmp_path / "out")],
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home")},
    )
    with torch.no_grad():
        expected = model(**batch).logits
    assert torch.equal(torch.load(tmp_path / "out"), expected)
