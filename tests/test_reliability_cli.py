"""Reliability battery, command line: arguments that do not fit end in an argparse usage error (exit status 2) or in
one of our named errors, never in a traceback from deep inside a library.

More cases: tests/test_cli.py (a bad --to), tests/test_training.py::test_bad_arguments_name_what_is_wrong (train's
data and config flags) and tests/test_hub.py (publish).
"""

import pytest
from conftest import tiny_model, tiny_t5
from transformers import BertConfig

from hf_switch.cli import main

USAGE_ERRORS = {
    "no_command": ([], "the following arguments are required: command"),
    "unknown_command": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "convert_without_to": (["convert", "{model}", "{out}"], "the following arguments are required: --to"),
    "convert_to_unknown_layout": (["convert", "{model}", "{out}", "--to", "onnx"], "invalid choice: 'onnx'"),
    "convert_from_nothing": (["convert", "{tmp}/absent", "{out}", "--to", "hf_switch"], "no folder at '{tmp}/absent'"),
    "upcycle_from_nothing": (["upcycle", "./absent", "{out}"], "no folder at './absent'"),
    "upcycle_non_integer_experts": (["upcycle", "{t5}", "{out}", "--num_experts", "many"], "invalid int value"),
    "upcycle_missing_destination": (["upcycle", "{t5}"], "the following arguments are required: destination"),
    "publish_without_repo_id": (["publish", "{model}"], "the following arguments are required: --repo-id"),
    "train_non_integer_steps": (["train", "--max_steps", "ten"], "invalid int value: 'ten'"),
    "train_unknown_choice": (["train", "--objective", "translation"], "invalid choice: 'translation'"),
}
NAMED_ERRORS = {
    "convert_a_bert_folder": (
        ["convert", "{bert}", "{out}", "--to", "hf_switch"],
        ValueError,
        "model_type='bert', but SwitchConfig loads",
    ),
    "upcycle_zero_experts": (["upcycle", "{t5}", "{out}", "--num_experts", "0"], Exception, "num_experts=0"),
    "upcycle_unknown_override": (
        ["upcycle", "{t5}", "{out}", "--config_overrides", "experts=2"],
        ValueError,
        "'experts=2' is not 'field=value'",
    ),
    "train_unknown_flag": (
        ["train", "--no_such_flag", "1"],
        ValueError,
        r"not used by the HfArgumentParser: \['--no_such",
    ),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_model().save_pretrained(root / "model")
    tiny_t5().save_pretrained(root / "t5")
    BertConfig().save_pretrained(root / "bert")
    return {"tmp": str(root), "model": str(root / "model"), "t5": str(root / "t5"), "bert": str(root / "bert")}


def _fill(arguments, folders, out):
    return [argument.format(out=out, **folders) for argument in arguments]


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_arguments_that_do_not_parse_end_in_a_usage_error(case, folders, tmp_path, capsys):
    arguments, message = USAGE_ERRORS[case]
    with pytest.raises(SystemExit) as raised:
        main(_fill(arguments, folders, tmp_path / "out"))
    assert raised.value.code == 2
    assert message.format(**folders) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(NAMED_ERRORS))
def test_arguments_that_parse_but_do_not_fit_raise_a_named_error(case, folders, tmp_path):
    arguments, error, message = NAMED_ERRORS[case]
    with pytest.raises(error, match=message):
        main(_fill(arguments, folders, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_publish_problems_exit_with_the_command_and_the_reason(folders, tmp_path):
    with pytest.raises(SystemExit, match="^hf-switch publish: A dry run writes the folder"):
        main(["publish", folders["model"], "--repo-id", "org/name", "--dry-run"])
