import pytest
import torch
from conftest import random_batch, reference_model, tiny_model
from transformers import SwitchTransformersForConditionalGeneration

from hf_switch import SwitchForConditionalGeneration
from hf_switch.cli import main


def test_info_prints_versions_and_registered_classes(capsys):
    main(["info"])
    printed = capsys.readouterr().out
    assert "transformers " in printed
    assert "AutoModelForSeq2SeqLM[SwitchConfig] -> SwitchForConditionalGeneration" in printed


def test_convert_round_trips_through_both_layouts(tmp_path):
    reference = reference_model(expert_capacity=2)
    reference.save_pretrained(tmp_path / "transformers")
    main(["convert", str(tmp_path / "transformers"), str(tmp_path / "ours"), "--to", "hf_switch"])
    main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "transformers"])
    ours = SwitchForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    back = SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    batch = random_batch()
    with torch.no_grad():
        expected = reference(**batch).logits
        assert torch.equal(back(**batch).logits, expected)
        assert (ours(**batch).logits - expected).abs().max() < 1e-5


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "--to", "onnx"])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


def test_convert_to_transformers_of_a_batch_routed_dropless_model_takes_an_expert_capacity(tmp_path, capsys):
    model = tiny_model(routing_group="batch", capacity_factor=None, router_ignore_padding_tokens=True)
    model.save_pretrained(tmp_path / "ours")
    command = ["convert", str(tmp_path / "ours"), str(tmp_path / "theirs"), "--to", "transformers"]
    with pytest.raises(SystemExit):
        main(command)
    assert "hf-switch convert --expert_capacity N" in capsys.readouterr().err
    main([*command, "--expert_capacity", "16"])
    assert "routes each sequence alone with 16 slots per expert" in capsys.readouterr().out
    theirs = SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path / "theirs").eval()
    batch = random_batch()  # no padding, 11 and 9 tokens: a capacity of 16 drops nothing, as our evaluation
    with torch.no_grad():
        assert (theirs(**batch).logits - model(**batch).logits).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("command", "groups"),
    [("train", ["model:", "data:"]), ("finetune", ["model:", "data:", "LoRA:"]), ("distill", ["distillation:"])],
)
def test_training_command_help_names_the_command_and_puts_its_own_flags_before_the_trainers(command, groups, capsys):
    with pytest.raises(SystemExit) as raised:
        main([command, "--help"])
    assert raised.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: hf-switch {command} [--flag value ...]")
    trainer = text.index("\nTrainer (every transformers Seq2SeqTrainingArguments flag):")
    assert all(0 < text.index(f"\n{group}\n") < trainer for group in groups)
    assert text.index("\nexamples:\n  hf-switch ") > trainer
    assert "--optim OPTIM " in text  # a long list of choices is not spelled out in the help
