"""Distilling a Switch model into a dense T5 (Fedus, Zoph & Shazeer 2021, §4.2).

Two pieces: `init_dense_student` builds a plain `transformers.T5ForConditionalGeneration` from the teacher's
non-expert weights (the paper's "non-expert init"), and `DistillationTrainer` trains it on a mixture of the
teacher's probabilities and the ground truth (0.25 / 0.75 in the paper). Shapes: `B` batch, `T` target length,
`V` vocabulary, `E` experts.
"""

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Seq2SeqTrainer, T5Config, T5ForConditionalGeneration

from .configuration_switch import require
from .modeling_switch import SwitchForConditionalGeneration
from .sharding import EmbeddingsInTheRootUnit
from .t5_transfer import (
    copy_non_ffn_weights,
    feed_forward_weight_names,
    paired_blocks,
    shared_config_fields,
    untie_like,
)

EXPERT_INITS = ("mean", "most_used", "fresh")


def _check_student_arguments(teacher, expert_init, data, num_layers, num_decoder_layers, d_ff) -> None:
    if not isinstance(teacher, SwitchForConditionalGeneration):
        raise TypeError(f"teacher: expected a hf_switch SwitchForConditionalGeneration, got {type(teacher).__name__}.")
    require(expert_init in EXPERT_INITS, "expert_init", expert_init, f"one of {EXPERT_INITS}")
    if expert_init == "most_used":
        require(data is not None, "data", data, "an iterable of batches when expert_init='most_used'")
    else:
        require(data is None, "data", data, f"None when expert_init={expert_init!r} (only 'most_used' reads data)")
    config = teacher.config
    for name, value, most in (
        ("num_layers", num_layers, config.num_layers),
        ("num_decoder_layers", num_decoder_layers, config.num_decoder_layers),
        ("d_ff", d_ff, config.d_ff),
    ):
        require(value is None or 1 <= value <= most, name, value, f"None or between 1 and the teacher's {most}")


def kept_layers(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Teacher layers a shallower student starts from: evenly spaced, always the first and (for 2+) the last.

    The first layer holds T5's relative position bias and the last one feeds the final norm, so both are kept;
    the rest are spread evenly, as when DistilBART or DistilBERT take every other layer.
    """
    if num_student_layers == 1:
        return [0]
    span = num_teacher_layers - 1
    return [i * span // (num_student_layers - 1) for i in range(num_student_layers)]


def _student_config(teacher_config, num_layers, num_decoder_layers, d_ff) -> T5Config:
    fields = shared_config_fields(teacher_config)
    fields["num_layers"] = num_layers or teacher_config.num_layers
    fields["num_decoder_layers"] = num_decoder_layers or teacher_config.num_decoder_layers
    fields["d_ff"] = d_ff or teacher_config.d_ff
    # T5 reads `tie_word_embeddings` only to decide whether to scale the decoder output by d_model**-0.5 (and then
    # always ties the embeddings and head); hf_switch ties and scales together. The caller unties where needed.
    return T5Config(tie_word_embeddings=teacher_config.tie_word_embeddings, **fields)


def _batch_to(batch: Mapping, device: torch.device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


@torch.no_grad()
def expert_token_counts(teacher: SwitchForConditionalGeneration, data: Iterable[Mapping]) -> dict[str, torch.Tensor]:
    """Tokens each expert of each sparse layer took over `data`, with the teacher in eval mode.

    Args:
        data: batches of keyword arguments for the teacher (`input_ids`, `attention_mask`, and `labels` or
            `decoder_input_ids`).

    Returns:
        `{"encoder": [sparse encoder layers, E], "decoder": [sparse decoder layers, E]}`.
    """
    config = teacher.config
    counts = {
        stack: torch.zeros(len(layers), config.num_experts, dtype=torch.long, device=teacher.device)
        for stack, layers in (("encoder", config.sparse_encoder_layers), ("decoder", config.sparse_decoder_layers))
    }
    was_training = teacher.training
    teacher.eval()
    try:
        for batch in data:
            output = teacher(**_batch_to(batch, teacher.device))
            for stack in counts:
                # None for a stack without sparse layers.
                stack_counts = getattr(output, f"{stack}_expert_counts")
                if stack_counts is not None:
                    counts[stack] += stack_counts
    finally:
        teacher.train(was_training)
    return counts


def _most_used_experts(teacher: SwitchForConditionalGeneration, data) -> dict[tuple[str, int], int]:
    """`{(stack, sparse block index): expert}`, the expert that took the most tokens in each sparse layer."""
    counts = expert_token_counts(teacher, data)
    layers = {"encoder": teacher.config.sparse_encoder_layers, "decoder": teacher.config.sparse_decoder_layers}
    most_used = {}
    for stack, stack_counts in counts.items():
        if stack_counts.numel() and stack_counts.sum() == 0:
            raise ValueError(f"data: the teacher's {stack} routed no tokens, so expert_init='most_used' cannot choose.")
        for block_index, layer_counts in zip(layers[stack], stack_counts, strict=True):
            most_used[(stack, block_index)] = int(layer_counts.argmax())
    return most_used


def _dense_ffn_state(teacher_ff: nn.Module, names, expert, d_ff: int) -> dict[str, torch.Tensor]:
    """State dict for a T5 dense feed-forward of width `d_ff`, from a teacher's feed-forward sub-layer.

    A sparse layer gives the mean of its stacked experts (`expert=None`) or expert `expert`. A narrower student
    keeps the first `d_ff` hidden units: hidden units have no order, so any choice prunes the others, and a slice
    keeps the student's feed-forward an exact sub-network of the teacher's.
    """
    state = {}
    for name in names:
        if teacher_ff.is_sparse:
            stacked = getattr(teacher_ff.mlp.experts, name)  # [E, out, in]
            weight = stacked.mean(dim=0) if expert is None else stacked[expert]
        else:
            weight = getattr(teacher_ff.mlp, name).weight  # [out, in]
        # wi, wi_0, wi_1 are [d_ff, d_model]; wo is [d_model, d_ff].
        state[f"{name}.weight"] = weight[:, :d_ff] if name == "wo" else weight[:d_ff]
    return state


@torch.no_grad()
def init_dense_student(
    teacher: SwitchForConditionalGeneration,
    expert_init: str = "mean",
    data: Iterable[Mapping] | None = None,
    num_layers: int | None = None,
    num_decoder_layers: int | None = None,
    d_ff: int | None = None,
) -> T5ForConditionalGeneration:
    """A dense T5 student initialised from a Switch teacher's non-expert weights (paper §4.2).

    The student has the teacher's dimensions, activation and output scaling, and takes its embeddings, language-model
    head, attention, layer norms and dense feed-forward layers. Each sparse layer's feed-forward becomes, by
    `expert_init`: `"mean"` the mean of the experts' weights; `"most_used"` a copy of the expert that took the most
    tokens on `data` (teacher in eval mode); `"fresh"` T5's own initialisation. The teacher multiplies each expert's
    output by its router probability; neither choice applies that factor, since it varies by token. With one expert
    and dropless routing it is exactly 1, and the student computes what the teacher computes.

    Args:
        teacher: the Switch model to distil.
        expert_init: `"mean"`, `"most_used"` or `"fresh"`.
        data: with `"most_used"` only, an iterable of batches (dicts of keyword arguments for the teacher).
        num_layers, num_decoder_layers: a shallower student; it starts from evenly spaced teacher layers including
            the first and last (see `kept_layers`). `None` keeps the teacher's depth.
        d_ff: a narrower feed-forward; it keeps the first `d_ff` hidden units of each teacher feed-forward (fresh
            layers are simply built narrower). `None` keeps the teacher's width.

    Returns:
        A `T5ForConditionalGeneration` on the teacher's device and dtype, in the teacher's train/eval mode. A student
        of a teacher with `tie_word_embeddings=False` has, like it, its own input embeddings and head (they save and
        reload as such).
    """
    _check_student_arguments(teacher, expert_init, data, num_layers, num_decoder_layers, d_ff)
    config = _student_config(teacher.config, num_layers, num_decoder_layers, d_ff)
    student = T5ForConditionalGeneration(config).to(device=teacher.device, dtype=teacher.dtype)
    untie_like(teacher, student)

    encoder_layers = kept_layers(teacher.config.num_layers, config.num_layers)
    decoder_layers = kept_layers(teacher.config.num_decoder_layers, config.num_decoder_layers)
    copy_non_ffn_weights(teacher, student, encoder_layers, decoder_layers)

    chosen = _most_used_experts(teacher, data) if expert_init == "most_used" else {}
    names = feed_forward_weight_names(config)
    for stack, teacher_index, teacher_block, student_block in paired_blocks(
        teacher, student, encoder_layers, decoder_layers
    ):
        teacher_ff = teacher_block.layer[-1]
        if teacher_ff.is_sparse and expert_init == "fresh":
            continue
        state = _dense_ffn_state(teacher_ff, names, chosen.get((stack, teacher_index)), config.d_ff)
        student_block.layer[-1].DenseReluDense.load_state_dict(state)
    return student.train(teacher.training)


def _token_average(per_token: torch.Tensor, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """Sum of `per_token` (`[B, T]`) over target tokens (`labels != -100`), divided by their number or, when the
    Trainer gives it, by `num_items_in_batch` (the target tokens of the whole accumulated, all-process batch)."""
    mask = labels != -100
    total = torch.where(mask, per_token, 0.0).sum()
    return total / (mask.sum() if num_items_in_batch is None else num_items_in_batch)


def _token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`[B, T]` cross-entropy of `logits` `[B, T, V]` against `labels` `[B, T]`; 0 where `labels == -100`."""
    flat = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none"
    )
    return flat.view_as(labels)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.25,
    temperature: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """`alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)`, averaged over target tokens.

    `teacher_T` and `student_T` are the softmax of the logits divided by the temperature `T`; the `T^2` keeps the soft
    term's gradients on the scale of the hard term's (Hinton et al. 2015). At `T = 1` this trains exactly like
    cross-entropy against the mixed target `alpha * teacher + (1 - alpha) * one_hot(labels)` (the two differ by the
    teacher's entropy, a constant), which is the paper's "0.25 teacher probabilities, 0.75 ground truth".

    Args:
        student_logits, teacher_logits: `[B, T, V]`.
        labels: `[B, T]`, -100 at positions that are not targets (padding); they count in neither term.
        num_items_in_batch: see `_token_average`.

    Returns:
        A scalar, in float32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits: shape {tuple(teacher_logits.shape)} differs from student_logits' "
            f"{tuple(student_logits.shape)}; teacher and student need the same vocabulary."
        )
    student_log_probs = nn.functional.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = nn.functional.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = nn.functional.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)
    per_token = alpha * temperature**2 * kl + (1 - alpha) * _token_cross_entropy(student_logits, labels)
    return _token_average(per_token, labels, num_items_in_batch)


class DistillationTrainer(EmbeddingsInTheRootUnit, Seq2SeqTrainer):
    """A `Seq2SeqTrainer` that trains its model (the student) on `distillation_loss` against a frozen teacher.

    The teacher is moved to the training device, put in eval mode and frozen; it is held by the trainer rather than
    passed to accelerate, so under `accelerate launch` (DDP) each process keeps a plain, unwrapped copy. Evaluation
    reports the student's ground-truth cross-entropy alone, so that `eval_loss` compares with a model trained
    without a teacher (and with what `predict_with_generate` reports).

    The loss is summed over target tokens and divided by the Trainer's `num_items_in_batch`, which the Trainer
    counts over the whole accumulated batch of every process; the Trainer then neither divides it by the gradient
    accumulation steps nor lets DDP's gradient averaging shrink it (see `compute_loss`). This is how transformers
    treats a model that computes its own loss from `num_items_in_batch`.

    Args:
        teacher: any seq2seq model returning `logits` of the student's vocabulary (typically a Switch model).
        alpha: weight of the teacher's soft targets, in [0, 1] (0.25 in the paper).
        temperature: softmax temperature of the soft targets, > 0.
        Other arguments as for `Seq2SeqTrainer`, `model` being the student. Label smoothing and `compute_loss_func`
        are refused, since this loss would silently replace them.
    """

    def __init__(self, *args, teacher: nn.Module, alpha: float = 0.25, temperature: float = 1.0, **kwargs):
        require(0 <= alpha <= 1, "alpha", alpha, "a number in [0, 1]")
        require(temperature > 0, "temperature", temperature, "a number > 0")
        super().__init__(*args, **kwargs)
        require(
            self.args.label_smoothing_factor == 0,
            "label_smoothing_factor",
            self.args.label_smoothing_factor,
            "0 with DistillationTrainer (the teacher's soft targets take its place)",
        )
        require(
            self.compute_loss_func is None,
            "compute_loss_func",
            self.compute_loss_func,
            "None with DistillationTrainer (it computes the distillation loss)",
        )
        require(
            self.args.n_gpu <= 1,
            "n_gpu",
            self.args.n_gpu,
            "1: run one process per device (accelerate launch or torchrun), not DataParallel",
        )
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.alpha = alpha
        self.temperature = temperature
        # The loss below honours `num_items_in_batch` whatever the student's forward accepts, so have the Trainer
        # count it (and treat the loss as already scaled for gradient accumulation).
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Distillation loss in training, the student's cross-entropy in evaluation (see the class docstring)."""
        outputs = model(**inputs)
        labels = inputs["labels"]
        if model.training:
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits
            loss = distillation_loss(
                outputs.logits, teacher_logits, labels, self.alpha, self.temperature, num_items_in_batch
            )
        else:
            loss = _token_average(_token_cross_entropy(outputs.logits, labels), labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # `num_items_in_batch` counts every process's tokens while DDP averages gradients over processes; undo
            # that average, as `Trainer.compute_loss` does.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss


@dataclass
class DistillationArguments:
    """Options of `hf-switch distill`, beside the training arguments (the teacher is `--model_name_or_path`)."""

    _argument_group_name = "distillation"

    expert_init: str = field(
        default="mean",
        metadata={
            "help": "student init: 'mean', 'most_used' (on 64 validation examples) or 'fresh' sparse feed-forwards "
            "with the teacher's other weights; 'none' for a freshly initialised T5 of the teacher's dims"
        },
    )
    distill_alpha: float = field(default=0.25, metadata={"help": "weight of the teacher's soft targets"})
    distill_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the soft targets"})
    student_num_layers: int | None = field(default=None, metadata={"help": "a shallower student encoder"})
    student_num_decoder_layers: int | None = field(default=None, metadata={"help": "a shallower student decoder"})
    student_d_ff: int | None = field(default=None, metadata={"help": "a narrower student feed-forward"})


def _student_from(teacher, arguments: DistillationArguments, datasets, collator) -> T5ForConditionalGeneration:
    if arguments.expert_init == "none":
        config = _student_config(
            teacher.config, arguments.student_num_layers, arguments.student_num_decoder_layers, arguments.student_d_ff
        )
        return T5ForConditionalGeneration(config).to(device=teacher.device, dtype=teacher.dtype)
    data = None
    if arguments.expert_init == "most_used":
        probe = datasets["validation"].select(range(min(64, len(datasets["validation"]))))
        data = [
            collator([probe[i] for i in range(start, min(start + 16, len(probe)))])
            for start in range(0, len(probe), 16)
        ]
    return init_dense_student(
        teacher,
        arguments.expert_init,
        data,
        arguments.student_num_layers,
        arguments.student_num_decoder_layers,
        arguments.student_d_ff,
    )


def distill_main(argv: list[str] | None = None) -> dict:
    """`hf-switch distill`: train a dense T5 student of the `--model_name_or_path` teacher; returns eval metrics."""
    from .training.train import closing_summary, end_training, parse_arguments, run

    model_args, data_args, training_args, arguments = parse_arguments(
        sys.argv[1:] if argv is None else argv,
        extra=(DistillationArguments,),
        defaults={"objective": "seq2seq"},
        prog="hf-switch distill",
        examples=(
            "hf-switch distill --model_name_or_path runs/switch --train_file pairs.jsonl --expert_init fresh "
            "--distill_alpha 0.25 --output_dir runs/student",
        ),
    )
    if model_args.model_name_or_path is None:
        raise ValueError("hf-switch distill needs the teacher: --model_name_or_path FOLDER (a Switch model).")
    require(
        arguments.expert_init in (*EXPERT_INITS, "none"),
        "--expert_init",
        arguments.expert_init,
        f"one of {(*EXPERT_INITS, 'none')}",
    )
    teachers = []

    def to_student(teacher, datasets, collator):
        teachers.append(teacher)
        return _student_from(teacher, arguments, datasets, collator)

    def trainer_class(**kwargs):
        return DistillationTrainer(
            teacher=teachers[0], alpha=arguments.distill_alpha, temperature=arguments.distill_temperature, **kwargs
        )

    trainer, metrics = run(model_args, data_args, training_args, prepare_model=to_student, trainer_class=trainer_class)
    end_training(trainer)
    if trainer.is_world_process_zero():
        folder = training_args.output_dir
        load = [
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # a plain T5: no plugin needed",
            f'model = AutoModelForSeq2SeqLM.from_pretrained("{folder}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
        ]
        next_steps = [f"hf-switch publish {folder} --repo-id ORG/NAME --dry-run --local-dir PUB"]
        print(closing_summary("distill", trainer, metrics, load, next_steps))
    return metrics


__all__ = [
    "DistillationArguments",
    "DistillationTrainer",
    "distill_main",
    "distillation_loss",
    "expert_token_counts",
    "init_dense_student",
    "kept_layers",
]
