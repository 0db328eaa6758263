"""`hf-switch train`: pretrain (span corruption) or finetune (seq2seq) a Switch model with `Seq2SeqTrainer`.

Arguments are `ModelArguments`, `DataArguments` and transformers' `Seq2SeqTrainingArguments`, as flags or in one
YAML/JSON file. With no data arguments it trains on an embedded offline default: span corruption on Python's own
help texts, with a tokenizer trained on them once and shipped in the package.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
import yaml
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    set_seed,
)

from ..configuration_switch import SwitchConfig
from ..modeling_switch import SwitchForConditionalGeneration, SwitchStack
from ..sharding import check_fsdp_engine
from .arguments import (
    PRESETS,
    DataArguments,
    ModelArguments,
    did_you_mean,
    parse_config_overrides,
    resolve_expert_parallel_size,
)
from .callbacks import TrainingClockCallback, add_routing_dashboard
from .data import check_columns, load_raw_datasets, load_test_split, tokenize, train_tokenizer
from .metrics import generation_metrics
from .trainer import SwitchTrainer

PREDICTIONS_FILE = "generated_predictions.txt"

logger = logging.getLogger(__name__)

# Defaults for every run. On a machine without an accelerator, `use_cpu` must be set for processes started by
# `accelerate launch` to train together (DDP over gloo); without it each one silently trains alone.
RUN_DEFAULTS = dict(
    output_dir="outputs/hf-switch",
    report_to=["tensorboard"],
    logging_steps=25,
    use_cpu=not torch.accelerator.is_available(),
)
# A model built from a preset trains from scratch: Trainer's defaults (learning rate 5e-5, batch 8, no warm-up) are
# for finetuning and leave a fresh model near its initial loss for hundreds of steps. Finetuning a saved or upcycled
# model keeps them.
FROM_SCRATCH_DEFAULTS = dict(
    per_device_train_batch_size=32,
    learning_rate=1e-3,
    warmup_steps=100,
)
# The embedded default job: a few minutes on a laptop CPU.
EMBEDDED_DEFAULTS = dict(
    max_steps=400,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    learning_rate=2e-3,
    warmup_steps=30,
    eval_strategy="steps",
    eval_steps=100,
    save_steps=200,
    max_eval_samples=256,
    max_source_length=64,
)
TRAIN_EXAMPLES = (
    "hf-switch train --max_steps 50 --output_dir /tmp/quick   # the embedded default, shortened",
    "hf-switch train --objective seq2seq --train_file pairs.jsonl --preset small --output_dir runs/mt",
)
# The embedded default's tokenizer, trained once on the embedded corpus (4,000 Unigram pieces) and shipped: Unigram
# training numbers its pieces differently on every call, and the default job should be reproducible.
EMBEDDED_TOKENIZER = Path(__file__).parent / "embedded_tokenizer"


class TrainerArguments(Seq2SeqTrainingArguments):
    """transformers' `Seq2SeqTrainingArguments`, under their own heading, after hf_switch's, in `--help`."""

    _argument_group_name = "Trainer (every transformers Seq2SeqTrainingArguments flag)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the examples epilog as written."""


def parse_arguments(
    argv: list[str],
    extra: tuple[type, ...] = (),
    defaults: dict | None = None,
    prog: str = "hf-switch train",
    examples: tuple[str, ...] = TRAIN_EXAMPLES,
) -> tuple:
    """`(ModelArguments, DataArguments, Seq2SeqTrainingArguments, *extra)` from flags or one YAML/JSON file.

    Flags and file values override `RUN_DEFAULTS`, the command's `defaults`, `FROM_SCRATCH_DEFAULTS` when the model is
    built from a preset and, when no data is given, `EMBEDDED_DEFAULTS`. A flag must be spelled out (no
    abbreviations); an unknown one is a usage error (exit 2) that suggests the closest known flags. `--help` shows
    the model, data and command flags (`extra`) first, then the Trainer's, then `examples`.
    """
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, *extra, TrainerArguments),
        prog=prog,
        usage="%(prog)s [--flag value ...]  |  %(prog)s CONFIG.yaml",
        allow_abbrev=False,
        formatter_class=_HelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {example}" for example in examples),
    )
    for action in parser._actions:
        if action.choices is not None and len(action.choices) > 8:  # e.g. --optim: dozens of names
            action.metavar = action.dest.upper()
    _refuse_unknown_flags(parser, argv)
    defaults = {**RUN_DEFAULTS, **(defaults or {})}
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        text = Path(argv[0]).read_text()
        values = json.loads(text) if argv[0].endswith(".json") else yaml.safe_load(text)
        model_args, data_args = parser.parse_dict({**defaults, **values})[:2]
        parsed = parser.parse_dict({**defaults, **_situational_defaults(model_args, data_args), **values})
    else:
        parser.set_defaults(**defaults)
        model_args, data_args = parser.parse_args_into_dataclasses(args=argv)[:2]
        parser.set_defaults(**_situational_defaults(model_args, data_args))
        parsed = parser.parse_args_into_dataclasses(args=argv)
    model_args, data_args, *extra_args, training_args = parsed
    return (model_args, data_args, training_args, *extra_args)


def _refuse_unknown_flags(parser: HfArgumentParser, argv: list[str]) -> None:
    known = parser._option_string_actions
    for flag in (argument.split("=", 1)[0] for argument in argv if argument.startswith("--")):
        if flag not in known:
            hint = did_you_mean(flag, known, otherwise=f"`{parser.prog} --help` lists the flags")
            parser.error(f"unrecognized argument {flag}; {hint}")


def _situational_defaults(model_args: ModelArguments, data_args: DataArguments) -> dict:
    """Defaults that depend on what is trained: from scratch (a preset) or not, on the embedded data or not."""
    from_scratch = model_args.model_name_or_path is None and model_args.upcycle_from is None
    return {
        **(FROM_SCRATCH_DEFAULTS if from_scratch else {}),
        **(EMBEDDED_DEFAULTS if data_args.uses_embedded_default else {}),
    }


def _training_texts(raw, data_args: DataArguments):
    train = raw["train"]
    if data_args.objective == "span_corruption":
        return train[data_args.text_column]
    return list(train[data_args.source_column]) + list(train[data_args.target_column])


def _shared_tokenizer(tokenizer_source, raw, data_args, model_args, training_args):
    """The run's tokenizer, the same in every process.

    Unigram training is not deterministic (ties and parallel sums), so only the first process trains a tokenizer;
    it saves it to the output dir, where the others read it (a shared filesystem, or `--tokenizer_name_or_path`).
    """
    if tokenizer_source is not None:
        return AutoTokenizer.from_pretrained(tokenizer_source)
    with training_args.main_process_first(desc="tokenizer", local=False):
        if training_args.process_index == 0:
            tokenizer = train_tokenizer(_training_texts(raw, data_args), model_args.tokenizer_vocab_size)
            tokenizer.save_pretrained(training_args.output_dir)
            return tokenizer
    return AutoTokenizer.from_pretrained(training_args.output_dir)


def build_model(model_args: ModelArguments, tokenizer, expert_parallel_size: int | None = None):
    """The model to train, sized to the tokenizer when built from a preset, its experts spread over
    `expert_parallel_size` ranks when given."""
    overrides = parse_config_overrides(model_args.config_overrides)
    if expert_parallel_size is not None:
        if model_args.architecture == "t5":
            raise ValueError(f"--expert_parallel_size={expert_parallel_size}: a dense T5 (--architecture t5) has none.")
        overrides["expert_parallel_size"] = expert_parallel_size
    if model_args.model_name_or_path and model_args.architecture == "t5":
        return T5ForConditionalGeneration.from_pretrained(model_args.model_name_or_path, **overrides)
    if model_args.model_name_or_path:
        return SwitchForConditionalGeneration.from_pretrained(model_args.model_name_or_path, **overrides)
    if model_args.upcycle_from:
        from ..upcycling import upcycle

        return upcycle(model_args.upcycle_from, **overrides)
    if model_args.preset not in PRESETS:
        raise ValueError(f"--preset={model_args.preset!r}: choose one of {sorted(PRESETS)}.")
    dims = {**PRESETS[model_args.preset], "vocab_size": len(tokenizer)}
    special = dict(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    if model_args.architecture == "t5":
        dense = {key: value for key, value in dims.items() if key != "num_experts"}
        return T5ForConditionalGeneration(T5Config(**dense, **special, **overrides))
    sparse = {
        "num_sparse_encoder_layers": dims["num_layers"] // 2,
        "num_sparse_decoder_layers": dims["num_layers"] // 2,
        # Padded batches: padding takes no expert capacity and stays out of the routing statistics.
        "router_ignore_padding_tokens": True,
        # Dropless training (every token reaches its expert) over batch-level routing groups: at capacity factor
        # 1.25 a fresh model's decoder layers dropped 7-22 % of their tokens on Multi30k by step 150, and 2.0
        # still up to 2.4 % (docs/experiments.md, routing ablation).
        "routing_group": "batch",
        "capacity_factor": None,
    }
    return SwitchForConditionalGeneration(SwitchConfig(**{**dims, **sparse, **special, **overrides}))


def _record_inference_settings(model, data_args: DataArguments, training_args: Seq2SeqTrainingArguments) -> None:
    """Write the run's generation length (and beams) into the model's generation config and its source prefix into
    `config.prefix` (transformers' name for it), which every save carries: `generate()` on the saved folder gives
    outputs as long as the run's, not transformers' 20-token default, and `hf-switch predict` applies the prefix."""
    generation = model.generation_config
    generation.max_length = training_args.generation_max_length or data_args.max_target_length
    if training_args.generation_num_beams is not None:
        generation.num_beams = training_args.generation_num_beams
    if data_args.source_prefix:
        model.config.prefix = data_args.source_prefix


def _check_prediction_arguments(data_args: DataArguments, training_args: Seq2SeqTrainingArguments) -> None:
    if training_args.do_predict and not data_args.has_test_data:
        raise ValueError("--do_predict needs a test set: --test_file, or --test_source_file and --test_target_file.")
    if data_args.has_test_data and not training_args.do_predict:
        raise ValueError("A test set is given without --do_predict: add --do_predict to predict it after training.")
    if training_args.do_predict and data_args.objective != "seq2seq":
        raise ValueError(f"--do_predict needs --objective seq2seq (sources and references), not {data_args.objective}.")


def _unknown_token_share(validation, tokenizer) -> float | None:
    """The share of the validation tokens (inputs and targets) that the tokenizer maps to `<unk>`, None for a
    tokenizer without one; warns when there are any: the characters behind them are lost (hf_switch's trained
    tokenizers fall back to bytes; others may not)."""
    if tokenizer.unk_token_id is None:
        return None
    columns = [column for column in ("input_ids", "labels") if column in validation.column_names]
    tokens = [token for column in columns for row in validation[column] for token in row]
    unknown = sum(token == tokenizer.unk_token_id for token in tokens)
    if unknown:
        logger.warning(
            "%s is %.1f %% of the validation tokens (%d of %d): the characters behind them are lost to the model. "
            "A tokenizer trained by hf-switch train (no --tokenizer_name_or_path) falls back to bytes instead.",
            tokenizer.unk_token,
            100 * unknown / len(tokens),
            unknown,
            len(tokens),
        )
    return unknown / max(len(tokens), 1)


def _limit(dataset, count):
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: Seq2SeqTrainingArguments,
    prepare_model=None,
    callbacks=(),
    trainer_class=SwitchTrainer,
) -> tuple[Seq2SeqTrainer, dict]:
    """Train, evaluate and save, then with `--do_predict` predict the test set; returns the trainer and the final
    evaluation metrics.

    `prepare_model(model, datasets, collator)` maps the built model to the one trained (wrapping it with LoRA
    adapters, or building a dense student from it as a teacher); `callbacks` are added to the Trainer, which
    `trainer_class(**keyword_arguments)` builds (a `Seq2SeqTrainer` subclass, or a function binding extra ones).
    """
    check_launcher_started_every_process()
    _check_prediction_arguments(data_args, training_args)
    set_seed(training_args.seed)  # before the model's random init, not only inside the Trainer
    test = load_test_split(data_args) if training_args.do_predict else None
    raw = load_raw_datasets(data_args, seed=training_args.seed)
    check_columns(raw, data_args)
    tokenizer_source = model_args.tokenizer_name_or_path
    model_folder = model_args.model_name_or_path or model_args.upcycle_from
    if tokenizer_source is None and model_folder and Path(model_folder, "tokenizer_config.json").exists():
        tokenizer_source = model_folder
    if tokenizer_source is None and data_args.uses_embedded_default:
        tokenizer_source = str(EMBEDDED_TOKENIZER)
    tokenizer = _shared_tokenizer(tokenizer_source, raw, data_args, model_args, training_args)
    with training_args.main_process_first(desc="tokenize"):
        datasets = tokenize(raw, tokenizer, data_args, seed=training_args.seed)
    unknown_share = _unknown_token_share(_limit(datasets["validation"], data_args.max_eval_samples), tokenizer)
    deepspeed_config = training_args.deepspeed_plugin.deepspeed_config if training_args.deepspeed_plugin else None
    expert_parallel_size = resolve_expert_parallel_size(model_args.expert_parallel_size, deepspeed_config)
    model = build_model(model_args, tokenizer, expert_parallel_size)
    if getattr(model.config, "expert_parallel_size", 1) > 1:
        from ..expert_parallel import check_deepspeed_config

        check_deepspeed_config(deepspeed_config)
        if training_args.do_predict:  # the main process would generate alone, waiting on the others' experts
            raise ValueError(
                "--do_predict with expert parallelism is not supported: predict the saved folder in one process with "
                "hf-switch predict OUTPUT_DIR TEST_FILE --references REFERENCES."
            )
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}: "
            "use the model's own tokenizer (--tokenizer_name_or_path)."
        )
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    if prepare_model is not None:
        model = prepare_model(model, datasets, collator)
    _record_inference_settings(model, data_args, training_args)

    compute_metrics = None
    if data_args.objective == "seq2seq" and training_args.predict_with_generate:
        references = _limit(raw["validation"], data_args.max_eval_samples)[data_args.target_column]
        compute_metrics = generation_metrics(tokenizer, data_args.metrics, references=list(references))
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=_limit(datasets["train"], data_args.max_train_samples),
        eval_dataset=_limit(datasets["validation"], data_args.max_eval_samples),
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[TrainingClockCallback(), *callbacks],
    )
    check_fsdp_engine(trainer)
    if any(isinstance(module, SwitchStack) for module in model.modules()):
        add_routing_dashboard(trainer)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    data_metrics = {} if unknown_share is None else {"validation_unk_share": unknown_share}
    trainer.save_metrics("train", {**train_result.metrics, **data_metrics})
    metrics = trainer.evaluate(max_length=data_args.max_target_length)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    if test is not None:
        predict_test_set(trainer, test, data_args)
    return trainer, metrics


def predict_test_set(trainer: Seq2SeqTrainer, test, data_args: DataArguments) -> None:
    """Predictions of the trained model for the test split in input order (`generated_predictions.txt`) and their
    scores against the raw references (`predict_results.json`, merged into `all_results.json`), written by the main
    process with the run's generation settings, prefix and source truncation."""
    from ..prediction import format_predictions, generate_predictions, score_predictions, write_atomically

    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        sources = list(test[data_args.source_column])
        predictions = generate_predictions(
            model,
            trainer.processing_class,
            sources,
            prefix=data_args.source_prefix,
            batch_size=trainer.args.per_device_eval_batch_size,
            max_source_length=data_args.max_source_length,
            progress=not trainer.args.disable_tqdm,
        )
        text = format_predictions(predictions, sources, path=None)
        write_atomically(Path(trainer.args.output_dir, PREDICTIONS_FILE), text)
        scores = score_predictions(predictions, list(test[data_args.target_column]), data_args.metrics)
        trainer.save_metrics("predict", {f"predict_{name}": value for name, value in scores.items()})
    trainer.accelerator.wait_for_everyone()


def end_training(trainer: Seq2SeqTrainer) -> None:
    """Release the process group once every process is done with it: the end of a command run by a launcher.

    A process that exits holding a gloo process group tears its communication threads down during interpreter
    finalization, which can abort it after a run that succeeded; under `torchrun` on several nodes the other nodes
    then wait out their exit barrier (5 minutes) for the node that failed. A no-op in a single process.
    """
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


# Evaluation entries that describe the evaluation run, not the model.
_BOOKKEEPING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")


def summary_text(headline: str, entries: dict[str, str], load: list[str], next_steps: list[str]) -> str:
    """The lines a command ends with: a headline, labelled entries, how to load what it wrote and what to run next."""
    return "\n".join(
        [
            headline,
            *(f"  {label + ':':<15}{value}" for label, value in entries.items()),
            "  load it:",
            *(f"    {line}" for line in load),
            "  next:",
            *(f"    {line}" for line in next_steps),
        ]
    )


def switch_load_lines(folder, with_tokenizer: bool = True) -> list[str]:
    """The lines that load a saved Switch model (and its tokenizer) with the Auto classes."""
    lines = [
        "import hf_switch  # registers the Switch classes with the Auto classes",
        f"from transformers import AutoModelForSeq2SeqLM{', AutoTokenizer' if with_tokenizer else ''}",
        f'model = AutoModelForSeq2SeqLM.from_pretrained("{folder}")',
    ]
    return lines + ([f'tokenizer = AutoTokenizer.from_pretrained("{folder}")'] if with_tokenizer else [])


def closing_summary(command: str, trainer: Seq2SeqTrainer, metrics: dict, load: list[str], next_steps: list[str]):
    """The end of a training command: where the model, plots and logs are, the final metrics, how to load the model
    and what to run next."""
    folder = Path(trainer.args.output_dir)
    scores = ", ".join(
        f"{name.removeprefix('eval_')} {f'{value:.4g}' if isinstance(value, float) else value}"
        for name, value in metrics.items()
        if name not in _BOOKKEEPING
    )
    plots = [str(folder / name) for name in ("loss_curves.png", "expert_load.png") if (folder / name).exists()]
    predictions = folder / PREDICTIONS_FILE
    train_results = folder / "train_results.json"
    unknown_share = (
        json.loads(train_results.read_text()).get("validation_unk_share") if train_results.exists() else None
    )
    logs = [str(folder / "trainer_state.json")]
    if (folder / "routing_stats.json").exists():
        logs.append(str(folder / "routing_stats.json"))
    if "tensorboard" in trainer.args.report_to:
        logs.append(f"TensorBoard: tensorboard --logdir {os.environ.get('TENSORBOARD_LOGGING_DIR', folder / 'runs')}")
    entries = {
        "saved to": str(folder),
        "final eval": scores or "-",
        "plots": ", ".join(plots) or "- (nothing logged)",
        **({"test set": f"{predictions}; scores in {folder / 'predict_results.json'}"} if predictions.exists() else {}),
        **({} if unknown_share is None else {"tokenizer": f"<unk> is {unknown_share:.2%} of the validation tokens"}),
        "logs": "; ".join(logs),
    }
    return summary_text(f"hf-switch {command}: done, {trainer.state.global_step} steps", entries, load, next_steps)


MULTI_PROCESS_OFF = ("--cpu", "--multi_gpu")  # left out of the suggested command, which sets --multi_gpu itself


def check_launcher_started_every_process() -> None:
    """Refuse a single process that `accelerate launch --num_processes N` (N > 1) started instead of N.

    Without `--multi_gpu` (or with `--cpu`), accelerate's launcher starts one process on a machine without GPUs and
    says nothing, so a run meant for N processes would train alone. The launcher is this process's parent; where its
    command line cannot be read (not Linux), nothing is checked.
    """
    if "WORLD_SIZE" in os.environ:
        return
    try:
        words = [word.decode() for word in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if word]
    except (OSError, UnicodeDecodeError):
        return
    launched = _accelerate_launch_arguments(words)
    if launched is None:
        return
    requested = 1
    for i, word in enumerate(launched):
        if word == "--num_processes" and i + 1 < len(launched):
            requested = int(launched[i + 1])
        elif word.startswith("--num_processes="):
            requested = int(word.split("=", 1)[1])
    if requested > 1:
        # `--cpu` also makes accelerate start a single process, `--multi_gpu` or not.
        command = ["accelerate", "launch", "--multi_gpu", *(word for word in launched if word not in MULTI_PROCESS_OFF)]
        raise ValueError(
            f"accelerate launch asked for {requested} processes but started one: without GPUs, its --num_processes "
            f"needs --multi_gpu (gloo on CPU). Run: {' '.join(command)}"
        )


def _accelerate_launch_arguments(words: list[str]) -> list[str] | None:
    """The arguments after `accelerate launch` (or `python -m accelerate.commands.launch`) in a command line."""
    for i, word in enumerate(words):
        if Path(word).name == "accelerate" and words[i + 1 : i + 2] == ["launch"]:
            return words[i + 2 :]
        if word == "accelerate.commands.launch" or Path(word).name == "accelerate-launch":
            return words[i + 1 :]
    return None


def main(argv: list[str] | None = None) -> dict:
    """`hf-switch train`: returns the final evaluation metrics."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    trainer, metrics = run(*parse_arguments(sys.argv[1:] if argv is None else argv))
    end_training(trainer)
    if trainer.is_world_process_zero():
        folder = trainer.args.output_dir
        print(
            closing_summary(
                "train",
                trainer,
                metrics,
                load=switch_load_lines(folder),
                next_steps=[
                    f"hf-switch finetune --model_name_or_path {folder} --train_file DATA.jsonl --output_dir OUT",
                    f"hf-switch publish {folder} --repo-id ORG/NAME --dry-run --local-dir PUBLISH",
                ],
            )
        )
    return metrics
