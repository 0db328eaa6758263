"""`hf-switch`: the command line. Each subcommand parses its arguments and calls one library function."""

import argparse
import importlib
import importlib.metadata
import os
import re
import sys
from pathlib import Path

from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    StrictDataclassClassValidationError,
)

# Commands with a parser of their own (transformers' HfArgumentParser dataclasses for training): their arguments are
# handed over untouched.
DELEGATED_COMMANDS = {
    "train": (
        "hf_switch.training",
        "main",
        "pretrain or finetune with Seq2SeqTrainer; with no data arguments, an embedded offline default",
    ),
    "finetune": ("hf_switch.lora", "finetune_main", "LoRA finetuning: train's arguments plus --lora_* and --merge"),
    "distill": (
        "hf_switch.distillation",
        "distill_main",
        "distil the --model_name_or_path Switch teacher into a dense T5: train's arguments plus --expert_init, "
        "--distill_alpha, --distill_temperature, --student_*",
    ),
    "predict": (
        "hf_switch.prediction",
        "predict_main",
        "translate or summarise a file with a saved model (Switch or T5) and score it against references",
    ),
}
# Mistakes in what the user asked for, as opposed to failures of the library: one line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, StrictDataclassClassValidationError)
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets", "evaluate", "safetensors", "huggingface_hub")


def _info(_: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

    import hf_switch

    print(f"hf_switch {hf_switch.__version__}")
    for package in (*PACKAGES, "deepspeed"):
        try:
            print(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{package} not installed")
    config_class = AutoConfig.for_model(hf_switch.SwitchConfig.model_type).__class__
    print(f"AutoConfig[{hf_switch.SwitchConfig.model_type!r}] -> {config_class.__name__}")
    for auto_class in (AutoModel, AutoModelForSeq2SeqLM):
        print(f"{auto_class.__name__}[SwitchConfig] -> {auto_class._model_mapping[config_class].__name__}")


def _convert(arguments: argparse.Namespace) -> None:
    from hf_switch import SwitchForConditionalGeneration, save_as_switch_transformers
    from hf_switch.training.arguments import check_model_folder_or_hub_id

    if Path(arguments.source, "latest").is_file():  # a DeepSpeed checkpoint: experts in per-expert files
        from hf_switch.expert_parallel import load_deepspeed_checkpoint

        model = load_deepspeed_checkpoint(arguments.source, arguments.config)
    elif arguments.config is not None:
        raise ValueError(f"--config is for DeepSpeed checkpoints; {arguments.source} is not one.")
    else:
        model = SwitchForConditionalGeneration.from_pretrained(check_model_folder_or_hub_id(arguments.source, "source"))
    if arguments.to == "transformers":
        save_as_switch_transformers(model, arguments.destination, expert_capacity=arguments.expert_capacity)
        if arguments.expert_capacity is not None:
            print(
                f"transformers' router routes each sequence alone with {arguments.expert_capacity} slots per expert "
                "and routes padding; a sequence longer than that can drop tokens this model would have kept."
            )
    elif arguments.expert_capacity is not None:
        raise ValueError("--expert_capacity is for --to transformers; an hf_switch folder keeps the model's routing.")
    else:
        model.save_pretrained(arguments.destination)
    print(f"wrote {arguments.to} layout to {arguments.destination}")


def _upcycle(arguments: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from hf_switch.training.arguments import parse_config_overrides
    from hf_switch.training.train import summary_text, switch_load_lines
    from hf_switch.upcycling import upcycle

    model = upcycle(
        arguments.dense,
        num_experts=arguments.num_experts,
        num_sparse_encoder_layers=arguments.num_sparse_encoder_layers,
        num_sparse_decoder_layers=arguments.num_sparse_decoder_layers,
        **parse_config_overrides(arguments.config_overrides),
    )
    model.save_pretrained(arguments.destination)
    if Path(arguments.dense, "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(arguments.dense).save_pretrained(arguments.destination)
    destination = arguments.destination
    print(
        summary_text(
            f"hf-switch upcycle: wrote a Switch model with {arguments.num_experts} experts per sparse layer",
            {"saved to": destination},
            switch_load_lines(destination, with_tokenizer=Path(destination, "tokenizer_config.json").exists()),
            [f"hf-switch train --model_name_or_path {destination} --train_file DATA --output_dir OUT"],
        )
    )


def _publish(arguments: argparse.Namespace) -> None:
    from hf_switch.hub import PublishError, publish

    try:
        result = publish(
            arguments.folder,
            arguments.repo_id,
            private=arguments.private,
            revision=arguments.revision,
            commit_message=arguments.commit_message,
            create_pr=arguments.create_pr,
            exist_ok=arguments.exist_ok,
            dry_run=arguments.dry_run,
            local_dir=arguments.local_dir,
            license=arguments.license,
            language=arguments.language,
            datasets=arguments.dataset,
            tags=arguments.tag,
            base_model=arguments.base_model,
            max_shard_size=arguments.max_shard_size,
        )
    except PublishError as error:
        sys.exit(f"hf-switch publish: {error}")
    if result.commit_url is None:
        print(f"dry run: would upload this {result.kind} folder to {arguments.repo_id}, built in {result.folder}:")
        for name in result.files:
            print(f"  {name} ({(result.folder / name).stat().st_size:,} bytes)")
    else:
        print(f"published {result.kind} folder: {result.pull_request_url or result.commit_url}")


def _folder_or_hub_id(text: str) -> str:
    """A local folder or a Hub id (`name` or `org/name`): a path to nothing is a usage error, not a failed download."""
    from hf_switch.training.arguments import check_folder_or_hub_id

    try:
        return check_folder_or_hub_id(text, "the folder")
    except FileNotFoundError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-switch", description="Switch Transformers for the Hugging Face stack.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="print versions and the registered classes").set_defaults(run=_info)

    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint between hf_switch's layout and transformers' SwitchTransformers layout, or "
        "consolidate a DeepSpeed (expert-parallel) checkpoint into one folder",
    )
    convert.add_argument(
        "source",
        type=_folder_or_hub_id,
        help="a folder (or Hub id) in either layout, or a DeepSpeed checkpoint folder (with a 'latest' file)",
    )
    convert.add_argument("destination", help="the folder to write")
    convert.add_argument("--to", required=True, choices=("transformers", "hf_switch"), help="the layout to write")
    convert.add_argument(
        "--config", help="a DeepSpeed checkpoint's model config: a folder or config.json (default: the checkpoint's)"
    )
    convert.add_argument(
        "--expert_capacity",
        type=int,
        help="with --to transformers: slots per expert and sequence for a model trained with batch routing groups, "
        "capacity factors or dropless routing, which transformers cannot express (a value of at least the longest "
        "sequence drops nothing)",
    )
    convert.set_defaults(run=_convert)

    upcycle = commands.add_parser("upcycle", help="turn a dense T5 folder into a Switch model (sparse upcycling)")
    upcycle.add_argument("dense", type=_folder_or_hub_id, help="a T5ForConditionalGeneration folder (or Hub id)")
    upcycle.add_argument("destination", help="the folder to write")
    upcycle.add_argument("--num_experts", type=int, default=8, help="experts per sparse layer")
    upcycle.add_argument("--num_sparse_encoder_layers", type=int, help="default: every other layer")
    upcycle.add_argument("--num_sparse_decoder_layers", type=int, help="default: every other layer")
    upcycle.add_argument("--config_overrides", help="other SwitchConfig fields, e.g. 'capacity_factor=1.0'")
    upcycle.set_defaults(run=_upcycle)

    for name, (_, _, description) in DELEGATED_COMMANDS.items():
        commands.add_parser(name, add_help=False, help=f"{description}; `hf-switch {name} --help` lists its flags")

    publish = commands.add_parser(
        "publish", help="upload a Switch model, a LoRA adapter or a dense student to the Hub, with a model card"
    )
    publish.add_argument("folder", help="a model folder (save_pretrained) or a peft adapter folder")
    publish.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    publish.add_argument("--private", action="store_true", help="create the repository as private")
    publish.add_argument("--revision", help="the branch to commit to, created when missing (default: main)")
    publish.add_argument("--commit-message", help="default: 'Upload <kind> with hf_switch'")
    publish.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    publish.add_argument("--exist-ok", action="store_true", help="commit to a repository that already exists")
    publish.add_argument("--dry-run", action="store_true", help="build the folder in --local-dir; upload nothing")
    publish.add_argument("--local-dir", help="where to build the folder (new or empty); a temporary one by default")
    publish.add_argument("--license", help="a Hub license identifier, e.g. apache-2.0")
    publish.add_argument("--language", nargs="+", help="language codes of the data, e.g. en de")
    publish.add_argument("--dataset", action="append", help="Hub id of a training dataset (repeatable)")
    publish.add_argument("--tag", action="append", help="an extra tag for the card (repeatable)")
    publish.add_argument("--base-model", help="Hub id of the model this one derives from (an adapter's base model)")
    publish.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: 5GB)")
    publish.set_defaults(run=_publish)
    return parser


def _user_error_message(error: Exception, argv: list[str]) -> str:
    # huggingface_hub's strict dataclasses wrap a config field's ValueError; the field's own message is the news.
    cause = error.__cause__ if isinstance(error, StrictDataclassClassValidationError) else None
    message = str(cause or error).strip()
    if _is_hub_lookup_failure(error):
        looked_up = [argument for argument in argv if HUB_ID.fullmatch(argument) and not Path(argument).exists()]
        message = " ".join(message.split())  # transformers' message spans lines
        message += f" (no local folder {' or '.join(map(repr, looked_up))}, so it was looked up on the Hub as an id)"
    return message


def _is_hub_lookup_failure(error: BaseException) -> bool:
    """Whether `error` is transformers' `OSError` for a model it could find neither locally nor on the Hub (raised
    while handling huggingface_hub's own error)."""
    while error is not None:
        if isinstance(error, (HfHubHTTPError, EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)):
            return True
        error = error.__context__
    return False


def main(argv: list[str] | None = None) -> None:
    """Run one command. A user error (bad value, missing file, invalid config field) prints one line and exits with
    status 2; `--debug` or `HF_SWITCH_DEBUG=1` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HF_SWITCH_DEBUG") == "1"
    argv = [argument for argument in argv if argument != "--debug"]
    command = argv[0] if argv else ""
    try:
        if command in DELEGATED_COMMANDS:
            module, function, _ = DELEGATED_COMMANDS[command]
            getattr(importlib.import_module(module), function)(argv[1:])
            return
        arguments = build_parser().parse_args(argv)
        arguments.run(arguments)
    except (*USER_ERRORS, OSError) as error:
        if debug or not (isinstance(error, USER_ERRORS) or _is_hub_lookup_failure(error)):
            raise
        print(f"hf-switch {command}: error: {_user_error_message(error, argv)}", file=sys.stderr)
        print("(run again with --debug for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
