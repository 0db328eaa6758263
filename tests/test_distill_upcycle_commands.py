"""`hf-switch distill`, `hf-switch upcycle` and `hf-switch train --upcycle_from`, end to end on tiny models."""

import pytest
import torch
from conftest import random_batch, tiny_t5, write_swap_pairs
from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

from hf_switch import SwitchForConditionalGeneration
from hf_switch.cli import main as cli
from hf_switch.distillation import distill_main
from hf_switch.training import main as train


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_swap_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


def _common(pairs):
    return [
        *("--report_to", "none", "--max_steps", "2", "--eval_strategy", "no", "--objective", "seq2seq"),
        *("--train_file", str(pairs), "--per_device_train_batch_size", "8"),
    ]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, pairs):
    folder = tmp_path_factory.mktemp("teacher")
    train([*_common(pairs), "--preset", "tiny", "--output_dir", str(folder), "--tokenizer_vocab_size", "120"])
    return folder


@pytest.mark.parametrize("expert_init", ["mean", "most_used", "none"])
def test_distill_writes_a_plain_t5_student(tmp_path, pairs, teacher, expert_init, capsys):
    metrics = distill_main(
        [
            *_common(pairs),
            "--model_name_or_path",
            str(teacher),
            "--output_dir",
            str(tmp_path),
            "--expert_init",
            expert_init,
        ]
    )
    assert metrics["eval_loss"] > 0
    student = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert isinstance(student, T5ForConditionalGeneration)
    summary = capsys.readouterr().out.split("hf-switch distill: done")[1]
    assert f'model = AutoModelForSeq2SeqLM.from_pretrained("{tmp_path}")' in summary


def test_distill_refuses_a_missing_teacher_and_an_unknown_init(tmp_path, pairs, teacher):
    with pytest.raises(ValueError, match="needs the teacher"):
        distill_main([*_common(pairs), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--expert_init='biggest'"):
        distill_main(
            [*_common(pairs), "--model_name_or_path", str(teacher), "--output_dir", str(tmp_path)]
            + ["--expert_init", "biggest"]
        )


def test_upcycle_command_starts_where_the_dense_model_left_off(tmp_path, teacher, capsys):
    dense = tiny_t5()
    dense.save_pretrained(tmp_path / "dense")
    cli(["upcycle", str(tmp_path / "dense"), str(tmp_path / "sparse"), "--num_experts", "4"])
    assert f"hf-switch train --model_name_or_path {tmp_path / 'sparse'}" in capsys.readouterr().out
    sparse = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "sparse").eval()
    assert isinstance(sparse, SwitchForConditionalGeneration) and sparse.config.num_experts == 4
    batch = random_batch()
    with torch.no_grad():
        sparse_logits, dense_logits = sparse(**batch).logits, dense.eval()(**batch).logits
    # The router starts near-uniform (not exactly), so the outputs agree to about its scale, 1e-3.
    assert (sparse_logits - dense_logits).abs().max() < 5e-3
    cross_entropy = [
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        for logits in (sparse_logits, dense_logits)
    ]
    assert cross_entropy[0].item() == pytest.approx(cross_entropy[1].item(), rel=1e-3)


def test_train_can_start_from_an_upcycled_dense_model(tmp_path, pairs, teacher):
    dense = tiny_t5(vocab_size=AutoModelForSeq2SeqLM.from_pretrained(teacher).config.vocab_size)
    dense.save_pretrained(tmp_path / "dense")
    arguments = [*_common(pairs), "--upcycle_from", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "run")]
    arguments += ["--tokenizer_name_or_path", str(teacher), "--config_overrides", "num_experts=2"]
    train(arguments)
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run").config.num_experts == 2
