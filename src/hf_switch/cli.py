"""`hf-switch`: the command line. Each subcommand parses its arguments and calls one library function."""

import argparse
import importlib.metadata
import sys

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

    model = SwitchForConditionalGeneration.from_pretrained(arguments.source)
    if arguments.to == "transformers":
        save_as_switch_transformers(model, arguments.destination)
    else:
        model.save_pretrained(arguments.destination)
    print(f"wrote {arguments.to} layout to {arguments.destination}")


def _demo(arguments: argparse.Namespace) -> None:
    from hf_switch.demo import run_demo

    run_demo(arguments.output_dir, arguments.max_steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-switch", description="Switch Transformers for the Hugging Face stack.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="print versions and the registered classes").set_defaults(run=_info)

    convert = commands.add_parser(
        "convert", help="convert a checkpoint between hf_switch's layout and transformers' SwitchTransformers layout"
    )
    convert.add_argument("source", help="a folder in either layout")
    convert.add_argument("destination", help="the folder to write")
    convert.add_argument("--to", required=True, choices=("transformers", "hf_switch"), help="the layout to write")
    convert.set_defaults(run=_convert)

    demo = commands.add_parser("demo", help="train a small Switch model offline for a few minutes (byte-level)")
    demo.add_argument("--output_dir", default="outputs/demo", help="where the trained model is saved")
    demo.add_argument("--max_steps", type=int, default=1200, help="training steps")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    arguments = build_parser().parse_args(argv)
    arguments.run(arguments)


if __name__ == "__main__":
    main(sys.argv[1:])
