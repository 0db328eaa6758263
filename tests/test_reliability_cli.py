"""Reliability battery, command line: arguments that do not fit end in an argparse usage error (exit status 2) or in
one line naming the problem (exit status 2, the traceback with --debug), never in a traceback from deep inside a
library.

More cases: tests/test_cli.py (a bad --to), tests/test_training.py::test_bad_arguments_name_what_is_wrong (train's
data and config flags) and tests/test_hub.py (publish).
"""

import re

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
    "train_unknown_flag": (["train", "--no_such_flag", "1"], "unrecognized argument --no_such_flag"),
    "train_abbreviated_flag": (
        ["train", "--max_step", "5"],
        "unrecognized argument --max_step; did you mean --max_steps",
    ),
}
# Arguments that parse but do not fit: one line naming the problem, exit status 2, the original error with --debug.
NAMED_ERRORS = {
    "convert_a_bert_folder": (
        ["convert", "{bert}", "{out}", "--to", "hf_switch"],
        ValueError,
        "model_type='bert', but SwitchConfig loads",
    ),
    "convert_a_folder_that_is_not_a_model": (
        ["convert", "{tmp}", "{out}", "--to", "hf_switch"],
        FileNotFoundError,
        "holds no config.json",
    ),
    "upcycle_zero_experts": (
        ["upcycle", "{t5}", "{out}", "--num_experts", "0"],
        Exception,
        "SwitchConfig.num_experts=0 is invalid",
    ),
    "upcycle_unknown_override": (
        ["upcycle", "{t5}", "{out}", "--config_overrides", "experts=2"],
        ValueError,
        "'experts' is not a SwitchConfig field; did you mean num_experts",
    ),
    "train_from_a_mistyped_local_folder": (
        ["train", "--model_name_or_path", "{tmp}/modle"],
        FileNotFoundError,
        "--model_name_or_path: no folder at '{tmp}/modle'",
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
def test_arguments_that_parse_but_do_not_fit_print_one_named_error_line(case, folders, tmp_path, capsys):
    arguments, error, message = NAMED_ERRORS[case]
    arguments = _fill(arguments, folders, tmp_path / "out")
    with pytest.raises(SystemExit) as raised:
        main(arguments)
    assert raised.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-2].startswith(f"hf-switch {arguments[0]}: error: ") and message.format(**folders) in lines[-2]
    assert "Traceback" not in "\n".join(lines) and lines[-1] == "(run again with --debug for the traceback)"
    with pytest.raises(error, match=re.escape(message.format(**folders))):
        main([*arguments, "--debug"])
    assert not (tmp_path / "out").exists()


def test_a_mistyped_relative_folder_is_not_taken_for_a_hub_id(folders, tmp_path, monkeypatch, capsys):
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["convert", "outputs/hf-swich", "out", "--to", "hf_switch"])
    assert "no folder at 'outputs/hf-swich' ('outputs' is a local folder" in capsys.readouterr().err


def test_a_source_found_neither_locally_nor_on_the_hub_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    import transformers.utils.hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):  # what huggingface_hub raises offline, without waiting on the network
        raise LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", unreachable)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as raised:
        main(["convert", "nonexistent/model", "out", "--to", "transformers"])
    assert raised.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("hf-switch convert: error: We couldn't connect"), lines
    assert "(no local folder 'nonexistent/model', so it was looked up on the Hub as an id)" in lines[0]
    with pytest.raises(OSError):
        main(["convert", "nonexistent/model", "out", "--to", "transformers", "--debug"])


def test_publish_problems_exit_with_the_command_and_the_reason(folders, tmp_path):
    with pytest.raises(SystemExit, match="^hf-switch publish: A dry run writes the folder"):
        main(["publish", folders["model"], "--repo-id", "org/name", "--dry-run"])
