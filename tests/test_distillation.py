"""Dense students initialised from a Switch teacher, and the distillation loss and trainer."""

import re

import pytest
import torch
from conftest import random_batch, tiny_model
from transformers import Seq2SeqTrainingArguments, T5ForConditionalGeneration, default_data_collator

from hf_switch import DistillationTrainer, init_dense_student
from hf_switch.distillation import distillation_loss, kept_layers

STUDENT_FFN_KEY = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.DenseReluDense\.(\w+)\.weight")


def _teacher_experts(teacher, student_key: str):
    """The teacher's stacked experts `[E, out, in]` behind a student key of the same depth; None if not sparse."""
    match = STUDENT_FFN_KEY.fullmatch(student_key)
    if match is None:
        return None
    stack, block, layer, name = match.groups()
    teacher_ff = teacher.get_submodule(f"{stack}.block.{block}.layer.{layer}")
    return getattr(teacher_ff.mlp.experts, name) if teacher_ff.is_sparse else None


@pytest.mark.parametrize(("feed_forward_proj", "tie_word_embeddings"), [("relu", True), ("gated-gelu", False)])
def test_one_dropless_expert_teacher_gives_a_student_with_its_logits(feed_forward_proj, tie_word_embeddings):
    teacher = tiny_model(
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tie_word_embeddings,
        num_decoder_layers=3,
        num_experts=1,
        num_sparse_decoder_layers=3,
        capacity_factor=None,
        eval_capacity_factor=None,
    )
    student = init_dense_student(teacher)
    assert type(student) is T5ForConditionalGeneration
    assert not student.training
    batch = random_batch(pad_last=2)
    with torch.no_grad():
        difference = (student(**batch).logits - teacher(**batch).logits).abs().max().item()
    assert difference < 1e-5


@pytest.mark.parametrize("expert_init", ["mean", "most_used", "fresh"])
def test_student_takes_non_expert_weights_exactly_and_expert_weights_by_expert_init(expert_init):
    teacher = tiny_model(num_experts=4)
    batch = random_batch(batch=4)
    with torch.no_grad():
        output = teacher(**batch)
    most_used = {
        "encoder": output.encoder_expert_counts[0].argmax(),
        "decoder": output.decoder_expert_counts[0].argmax(),
    }
    student = init_dense_student(teacher, expert_init, data=[batch] if expert_init == "most_used" else None)

    teacher_state, expert_derived = teacher.state_dict(), 0
    for key, value in student.state_dict().items():
        experts = _teacher_experts(teacher, key)
        if experts is None:
            assert torch.equal(value, teacher_state[key.replace(".DenseReluDense.", ".mlp.")]), key
            continue
        expert_derived += 1
        candidates = {"mean": experts.mean(dim=0), **{f"expert {e}": expert for e, expert in enumerate(experts)}}
        if expert_init == "fresh":
            assert not any(torch.equal(value, candidate) for candidate in candidates.values()), key
        else:
            expected = experts.mean(dim=0) if expert_init == "mean" else experts[most_used[key.split(".")[0]]]
            assert torch.equal(value, expected), key
    assert expert_derived == 4  # wi and wo of one sparse layer per stack


def test_kept_layers_are_evenly_spaced_with_the_first_and_last():
    assert kept_layers(4, 4) == [0, 1, 2, 3]
    assert kept_layers(4, 3) == [0, 1, 3]
    assert kept_layers(12, 6) == [0, 2, 4, 6, 8, 11]
    assert kept_layers(5, 1) == [0]


def test_smaller_student_takes_kept_layers_and_the_first_hidden_units():
    teacher = tiny_model(num_layers=4, num_decoder_layers=2, num_sparse_encoder_layers=2)  # sparse encoder 1, 3
    student = init_dense_student(teacher, num_layers=3, num_decoder_layers=1, d_ff=16)
    assert (student.config.num_layers, student.config.num_decoder_layers, student.config.d_ff) == (3, 1, 16)

    last_student, last_teacher = student.encoder.block[2], teacher.encoder.block[3]
    attention = last_teacher.layer[0].state_dict()
    assert all(torch.equal(value, attention[key]) for key, value in last_student.layer[0].state_dict().items())
    experts = last_teacher.layer[1].mlp.experts
    assert torch.equal(last_student.layer[1].DenseReluDense.wi.weight, experts.wi.mean(dim=0)[:16])
    assert torch.equal(last_student.layer[1].DenseReluDense.wo.weight, experts.wo.mean(dim=0)[:, :16])
    dense = teacher.decoder.block[0].layer[2].mlp
    assert torch.equal(student.decoder.block[0].layer[2].DenseReluDense.wo.weight, dense.wo.weight[:, :16])
    with torch.no_grad():
        assert torch.isfinite(student(**random_batch()).loss)


def test_distillation_loss_is_the_hand_computed_mixture():
    torch.manual_seed(0)
    student_logits, teacher_logits = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.tensor([[4, 0, -100], [2, -100, -100]])
    alpha, temperature = 0.25, 2.0

    targets = [(b, t) for b in range(2) for t in range(3) if labels[b, t] != -100]
    total = 0.0
    for b, t in targets:
        p = torch.softmax(teacher_logits[b, t] / temperature, dim=-1)
        q = torch.softmax(student_logits[b, t] / temperature, dim=-1)
        kl = (p * (p / q).log()).sum()
        cross_entropy = -torch.log_softmax(student_logits[b, t], dim=-1)[labels[b, t]]
        total += alpha * temperature**2 * kl + (1 - alpha) * cross_entropy

    loss = distillation_loss(student_logits, teacher_logits, labels, alpha, temperature)
    assert loss.item() == pytest.approx(total.item() / len(targets), rel=1e-6)
    summed = distillation_loss(student_logits, teacher_logits, labels, alpha, temperature, num_items_in_batch=7)
    assert summed.item() == pytest.approx(total.item() / 7, rel=1e-6)
    # alpha=0 is plain cross-entropy, whatever the teacher says.
    plain = torch.nn.functional.cross_entropy(student_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert distillation_loss(student_logits, teacher_logits, labels, alpha=0.0).item() == pytest.approx(plain.item())


def _dataset(size=4):
    batch = random_batch(batch=size, seed=3)
    batch["labels"][0, 3:] = -100  # padded targets, so that token and sequence averages differ
    batch["labels"][1, 6:] = -100
    return [{key: value[row] for key, value in batch.items()} for row in range(size)]


def _trainer(tmp_path, student, teacher, **arguments):
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        **arguments,
    )
    return DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=_dataset(),
        eval_dataset=_dataset(),
        data_collator=default_data_collator,
    )


def test_distillation_trainer_trains_the_student_and_leaves_the_teacher_alone(tmp_path):
    teacher = tiny_model(num_experts=4)
    teacher_before = {key: value.clone() for key, value in teacher.state_dict().items()}
    student = init_dense_student(teacher).train()
    student_before = student.shared.weight.clone()

    trainer = _trainer(tmp_path, student, teacher, max_steps=2, per_device_train_batch_size=2)
    trainer.train()

    assert not torch.equal(student.shared.weight, student_before)
    assert not teacher.training
    assert all(parameter.grad is None and not parameter.requires_grad for parameter in teacher.parameters())
    assert all(torch.equal(value, teacher_before[key]) for key, value in teacher.state_dict().items())
    # Evaluation reports the student's own cross-entropy over all target tokens.
    eval_batch = default_data_collator(_dataset())
    with torch.no_grad():
        expected = student.eval()(**eval_batch).loss
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_accumulation_steps_like_one_batch(tmp_path):
    """The loss is averaged over the accumulated batch's tokens, not per micro-batch (num_items_in_batch)."""
    teacher = tiny_model(num_experts=4)
    students = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        student = init_dense_student(teacher).train()
        arguments = dict(max_steps=1, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation)
        _trainer(tmp_path, student, teacher, **arguments).train()
        students.append(student)
    one_batch, accumulated = (dict(student.named_parameters()) for student in students)
    for name, parameter in one_batch.items():
        torch.testing.assert_close(accumulated[name], parameter, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"expert_init": "median"}, ValueError, r"expert_init='median' is invalid.*'mean', 'most_used', 'fresh'"),
        ({"expert_init": "most_used"}, ValueError, r"data=None is invalid.*most_used"),
        ({"data": [{}]}, ValueError, r"data=\[\{\}\] is invalid: data must be None when expert_init='mean'"),
        ({"num_layers": 0}, ValueError, r"num_layers=0 is invalid.*between 1 and the teacher's 2"),
        ({"num_decoder_layers": 3}, ValueError, r"num_decoder_layers=3 is invalid"),
        ({"d_ff": 64}, ValueError, r"d_ff=64 is invalid.*teacher's 32"),
    ],
)
def test_init_dense_student_names_bad_arguments(arguments, error, match):
    with pytest.raises(error, match=match):
        init_dense_student(tiny_model(), **arguments)


def test_bad_teacher_and_trainer_arguments_are_named(tmp_path):
    with pytest.raises(TypeError, match="teacher: expected a hf_switch SwitchForConditionalGeneration, got Linear"):
        init_dense_student(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="data: the teacher's encoder routed no tokens"):
        init_dense_student(tiny_model(), "most_used", data=[])
    teacher = tiny_model()
    student = init_dense_student(teacher)
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    for arguments, match in (
        ({"alpha": 1.5}, r"alpha=1.5 is invalid: alpha must be a number in \[0, 1\]"),
        ({"temperature": 0}, "temperature=0 is invalid"),
    ):
        with pytest.raises(ValueError, match=match):
            DistillationTrainer(model=student, teacher=teacher, args=args, **arguments)
    smoothing = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, label_smoothing_factor=0.1
    )
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 is invalid"):
        DistillationTrainer(model=student, teacher=teacher, args=smoothing)
