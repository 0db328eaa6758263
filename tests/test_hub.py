"""Publishing to the Hub, end to end against a loopback Hub (tests/hub_server.py): remote code, cards, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, random_batch, reference_model, tiny_model, tiny_t5
from hub_server import TOKEN, HubServer
from huggingface_hub import ModelCard, constants, hf_api
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

from hf_switch.cli import main
from hf_switch.hub import (
    PublishError,
    count_parameters,
    publish,
    read_distillation,
    read_eval_results,
    read_routing_stats,
)
from hf_switch.lora import load_adapter

EXAMPLES = Path(__file__).parents[1] / "model_cards" / "examples"
ROUTING_STATS = {
    "history": [
        {
            "step": 200,
            "layers": {
                "encoder.1": {"expert_counts": [30, 20, 40, 10], "dropped_fraction": 0.05, "aux_loss": 1.2},
                "decoder.1": {"expert_counts": [25, 25, 25, 25], "dropped_fraction": 0.0},
            },
        }
    ]
}
EVAL_RESULTS = {
    "task_type": "translation",
    "dataset": {"name": "Multi30k en-de", "type": "bentrevett/multi30k", "split": "validation"},
    "metrics": {"bleu": 12.5, "loss": 2.25},
}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A loopback Hub that this process's huggingface_hub talks to, a valid token in HF_TOKEN and no login cache."""
    with HubServer() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf_api.api, "endpoint", server.endpoint)  # behind module-level functions (file_exists)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_login" / "token"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def switch_folder(path: Path, **overrides) -> Path:
    """A tiny Switch model with a tokenizer, training routing statistics, evaluation results and a plot."""
    tiny_model(**overrides).save_pretrained(path)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)
    (path / "routing_stats.json").write_text(json.dumps(ROUTING_STATS))
    (path / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    (path / "expert_load.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return path


REMOTE_LOAD = """
import sys, torch
sys.modules["hf_switch"] = None  # hf_switch must not be importable
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)("w5 w7").input_ids[:2] == [5, 7]
batch = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(**batch).logits, sys.argv[3])
"""


def test_published_switch_model_loads_from_the_hub_without_hf_switch(hub, tmp_path):
    source = switch_folder(tmp_path / "model", expert_capacity=2)
    result = publish(
        source, "org/tiny-switch", private=True, license="apache-2.0", language=["en", "de"], max_shard_size="20KB"
    )

    committed = hub.repos["org/tiny-switch"].branches["main"].files
    assert hub.repos["org/tiny-switch"].private
    assert sorted(committed) == result.files
    assert {"modeling_switch.py", "configuration_switch.py", "routing.py", "experts.py", "cache.py"} <= set(committed)
    assert {"tokenizer.json", "generation_config.json", "model.safetensors.index.json"} <= set(committed)
    assert sum(name.endswith(".safetensors") for name in committed) > 1  # sharded
    assert json.loads(committed["config.json"])["auto_map"]["AutoModelForSeq2SeqLM"] == (
        "modeling_switch.SwitchForConditionalGeneration"
    )
    assert [request for request in hub.requests if "/commit/" in request] == [
        "POST /api/models/org/tiny-switch/commit/main"
    ]

    batch = random_batch(pad_last=2)
    torch.save(batch, tmp_path / "batch.pt")
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,  # the repository is private
        "HF_HOME": str(tmp_path / "fresh_hf_home"),
        "NO_PROXY": "127.0.0.1",
    }
    command = [sys.executable, "-c", REMOTE_LOAD, "org/tiny-switch", str(tmp_path / "batch.pt"), str(tmp_path / "out")]
    loaded = subprocess.run(
        command, check=True, env=env, timeout=120, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    assert "Do you wish to run the custom code" not in loaded.stdout + loaded.stderr  # the card's lines, no prompt
    reference = AutoModelForSeq2SeqLM.from_pretrained(source).eval()
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out"), reference(**batch).logits)


def test_switch_card_has_metadata_parameters_routing_and_evaluation(tmp_path):
    source = switch_folder(tmp_path / "model", router_top_k=2)
    publish(source, "org/tiny-switch", dry_run=True, local_dir=tmp_path / "out", datasets=["bentrevett/multi30k"])
    card = ModelCard.load(tmp_path / "out" / "README.md")

    assert card.data.pipeline_tag == "text2text-generation"
    assert {"mixture-of-experts", "switch-transformers"} <= set(card.data.tags)
    [bleu, loss] = card.data.eval_results
    assert (bleu.metric_type, bleu.metric_value, bleu.dataset_type) == ("bleu", 12.5, "bentrevett/multi30k")
    assert (loss.task_type, loss.dataset_split) == ("translation", "validation")
    parameters = count_parameters(AutoModelForSeq2SeqLM.from_pretrained(source))
    assert f"| parameters active per token | {parameters.active:,}" in card.text
    assert "| load balancing | auxiliary loss over each routing group |" in card.text
    assert "| encoder.1 | 1.60 | 0.45 | 0.0500 | 1.2000 | - |" in card.text
    assert "![expert_load.png](expert_load.png)" in card.text
    assert 'from_pretrained("org/tiny-switch", trust_remote_code=True)' in card.text
    assert 'tokenizer = AutoTokenizer.from_pretrained("org/tiny-switch", trust_remote_code=True)' in card.text
    assert "Dropped tokens" in card.text and "Routing bias" in card.text
    assert (tmp_path / "out" / "expert_load.png").exists()


def test_a_transformers_switch_checkpoint_is_published_in_hf_switch_layout_with_code(tmp_path):
    reference_model().save_pretrained(tmp_path / "transformers")
    result = publish(tmp_path / "transformers", "org/converted", dry_run=True, local_dir=tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (result.kind, config["model_type"]) == ("switch", "hf_switch")
    assert "auto_map" in config and "modeling_switch.py" in result.files


def test_a_failed_dry_run_leaves_local_dir_as_it_was(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(PublishError, match="license 'apache'"):
        publish(switch_folder(tmp_path / "model"), "org/x", dry_run=True, local_dir=tmp_path / "out", license="apache")
    assert list((tmp_path / "out").iterdir()) == []


def test_active_parameters_count_top_k_experts_per_sparse_layer():
    model = tiny_model(router_top_k=2)
    total = sum(parameter.numel() for parameter in model.parameters())
    per_expert = 2 * model.config.d_ff * model.config.d_model  # wi and wo
    sparse_layers = model.config.num_sparse_encoder_layers + model.config.num_sparse_decoder_layers
    idle_experts = model.config.num_experts - model.config.router_top_k
    assert count_parameters(model).total == total
    assert count_parameters(model).active == total - sparse_layers * idle_experts * per_expert


def test_dry_run_lists_the_folder_and_sends_nothing_even_without_a_token(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    source = switch_folder(tmp_path / "model")
    main(["publish", str(source), "--repo-id", "org/tiny-switch", "--dry-run", "--local-dir", str(tmp_path / "out")])

    printed = capsys.readouterr().out
    assert "dry run: would upload this switch folder to org/tiny-switch" in printed
    assert "  modeling_switch.py (" in printed and "  README.md (" in printed
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert hub.requests == []


def test_no_token_fails_before_any_request(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match="No Hugging Face token found.*hf auth login.*HF_TOKEN"):
        publish(switch_folder(tmp_path / "model"), "org/tiny-switch")
    assert hub.requests == []


def test_rejected_token_is_named(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(PublishError, match="rejected the token"):
        publish(switch_folder(tmp_path / "model"), "org/tiny-switch")
    assert "org/tiny-switch" not in hub.repos


def test_an_unreachable_hub_is_named(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(PublishError, match="Could not reach the Hub at http://127.0.0.1:9"):
        publish(switch_folder(tmp_path / "model"), "org/tiny-switch")


def test_an_existing_repository_needs_exist_ok_then_takes_a_branch_or_a_pull_request(hub, tmp_path):
    source = switch_folder(tmp_path / "model")
    publish(source, "org/tiny-switch")
    with pytest.raises(PublishError, match="org/tiny-switch already exists. Pass exist_ok=True"):
        publish(source, "org/tiny-switch")

    publish(source, "org/tiny-switch", exist_ok=True, revision="dev", commit_message="to dev")
    pull = publish(source, "org/tiny-switch", exist_ok=True, create_pr=True)
    repo = hub.repos["org/tiny-switch"]
    assert repo.branches["dev"].files == repo.branches["main"].files
    assert pull.pull_request_url.endswith("/org/tiny-switch/discussions/1") and len(repo.pulls) == 1


def test_a_network_failure_mid_upload_publishes_nothing(hub, tmp_path):
    source = switch_folder(tmp_path / "model")
    hub.drop_next("commit")  # the weights reach LFS storage, then the connection drops on the commit
    with pytest.raises(PublishError, match="Server disconnected.*Nothing was half-published.*exist_ok=True"):
        publish(source, "org/tiny-switch")
    assert hub.lfs_objects and hub.repos["org/tiny-switch"].branches["main"].files == {}

    publish(source, "org/tiny-switch", exist_ok=True)
    assert "model.safetensors" in hub.repos["org/tiny-switch"].branches["main"].files


@pytest.mark.parametrize(
    "metadata, problems",
    [
        (
            {"license": "apache", "language": "English", "tags": [" moe"], "datasets": ["not a repo"]},
            ["license 'apache'", "language 'English'", "tag ' moe'", "datasets entry 'not a repo'"],
        ),
        ({"base_model": "../model"}, ["base_model entry '../model'"]),
    ],
)
def test_invalid_card_metadata_is_caught_before_any_request(hub, tmp_path, metadata, problems):
    with pytest.raises(PublishError, match="Invalid model card metadata") as error:
        publish(switch_folder(tmp_path / "model"), "org/tiny-switch", **metadata)
    assert all(problem in str(error.value) for problem in problems)
    assert hub.requests == []


@pytest.mark.parametrize(
    "file_name, content, message",
    [
        (
            "routing_stats.json",
            {"history": [{"layers": {"encoder.1": {"expert_counts": [0, 0]}}}]},
            "expert_counts must be",
        ),
        ("eval_results.json", {"metrics": {"bleu": 3.0}}, 'dataset must be an object with "name" and "type"'),
        ("eval_results.json", {"dataset": {"name": "x", "type": "y"}, "metrics": {"bleu": "high"}}, "metrics must"),
    ],
)
def test_malformed_card_inputs_name_the_file_and_the_field(hub, tmp_path, file_name, content, message):
    source = switch_folder(tmp_path / "model")
    (source / file_name).write_text(json.dumps(content))
    with pytest.raises(PublishError, match=f"{file_name}: .*{message}"):
        publish(source, "org/tiny-switch")
    assert hub.requests == []


def test_trainer_eval_results_without_a_dataset_make_a_card_without_model_index(hub, tmp_path):
    source = switch_folder(tmp_path / "model")
    (source / "eval_results.json").write_text(json.dumps({"eval_loss": 1.5, "eval_runtime": 2.0}))
    publish(source, "org/tiny-switch", dry_run=True, local_dir=tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert not card.data.eval_results
    assert "its dataset was not named when publishing" in card.text and "| loss | 1.5 |" in card.text


def test_trainer_eval_results_become_a_model_index_on_the_named_dataset(tmp_path):
    (tmp_path / "eval_results.json").write_text(json.dumps({"eval_loss": 1.5, "eval_runtime": 2.0, "epoch": 3.0}))
    evaluation = read_eval_results(tmp_path, datasets=["bentrevett/multi30k"])
    assert evaluation.metrics == {"loss": 1.5} and evaluation.dataset_type == "bentrevett/multi30k"


def test_adapter_card_names_the_base_model_and_the_adapter_loads_from_the_hub(hub, tmp_path):
    base = tiny_model()
    base.save_pretrained(tmp_path / "base")
    lora = get_peft_model(
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base"), LoraConfig(target_modules=["q", "v"], r=2)
    )
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:  # lora_B starts at zero, which would make the adapter a no-op
            torch.nn.init.normal_(parameter)
    lora.save_pretrained(tmp_path / "adapter")

    with pytest.raises(PublishError, match="not a Hub repo id.*base_model='ORG/NAME'"):
        publish(tmp_path / "adapter", "org/tiny-lora")  # adapter_config.json names a local path
    result = publish(tmp_path / "adapter", "org/tiny-lora", base_model="org/tiny-switch")

    assert result.kind == "adapter"
    assert result.files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = ModelCard(hub.repos["org/tiny-lora"].branches["main"].files["README.md"].decode())
    assert (card.data.base_model, card.data.library_name) == ("org/tiny-switch", "peft")
    assert 'model = load_adapter(base, "org/tiny-lora")' in card.text
    assert "| target modules | `q`, `v` |" in card.text or "| target modules | `v`, `q` |" in card.text
    loaded = load_adapter(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base"), "org/tiny-lora")
    batch = random_batch()
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(**batch).logits, lora.eval()(**batch).logits)
        assert not torch.allclose(loaded(**batch).logits, base(**batch).logits)


def test_student_card_names_the_teacher_and_what_was_kept(tmp_path):
    tiny_t5().save_pretrained(tmp_path / "student")
    distillation = json.loads((EXAMPLES / "distillation.json").read_text())
    (tmp_path / "student" / "distillation.json").write_text(json.dumps(distillation))
    result = publish(tmp_path / "student", "org/tiny-student", dry_run=True, local_dir=tmp_path / "out")

    assert result.kind == "student"
    assert "modeling_switch.py" not in result.files and "auto_map" not in json.loads(
        (tmp_path / "out" / "config.json").read_text()
    )
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == distillation["teacher"]
    assert "distillation" in card.data.tags
    assert f"| teacher | {distillation['teacher']} |" in card.text
    assert "| expert init | `mean` |" in card.text


def test_documented_examples_parse():
    assert read_routing_stats(EXAMPLES).layers[0].name == "encoder.1"
    assert read_eval_results(EXAMPLES, datasets=None).metrics
    assert read_distillation(EXAMPLES)["teacher"]
