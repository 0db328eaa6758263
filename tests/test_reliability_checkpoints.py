"""Reliability battery, checkpoints: corrupted, truncated, incomplete or mismatched folders fail loudly and name what
is wrong; saves are atomic (a save killed midway leaves the previous folder loadable, bit for bit)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from hf_switch import SwitchEncoderModel, SwitchForConditionalGeneration

ROUTER_KEY = "encoder.block.1.layer.1.mlp.router.classifier.weight"
EXPERT_KEY = "decoder.block.1.layer.2.mlp.experts.wi"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny model and its folder (read-only: tests copy what they damage)."""
    folder = tmp_path_factory.mktemp("saved")
    model = tiny_model()
    model.save_pretrained(folder)
    return model, folder


def _copy(folder, destination):
    destination.mkdir()
    for file in folder.iterdir():
        (destination / file.name).write_bytes(file.read_bytes())
    return destination


def _rewrite_weights(folder, change):
    """Apply `change(state_dict)` to the folder's single weight file."""
    path = folder / "model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


def _assert_same_weights(model, other):
    first, second = model.state_dict(), other.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 0.999))
def test_a_truncated_weight_file_is_reported_as_truncated_naming_it(saved, tmp_path_factory, fraction):
    folder = _copy(saved[1], tmp_path_factory.mktemp("truncated") / "model")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(OSError, match=rf"^{path}: truncated (or corrupted )?safetensors file"):
        SwitchForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data + b"\0" * 10, "corrupted safetensors file: it holds"),
        (lambda data: data[:8] + b"\xff" * 16 + data[24:], "do not start with a readable header"),
        (lambda data: (2**60).to_bytes(8, "little") + data[8:], "do not start with a readable header"),
    ],
    ids=["trailing_bytes", "garbled_header", "absurd_header_length"],
)
def test_a_corrupted_weight_file_is_named(saved, tmp_path, damage, message):
    folder = _copy(saved[1], tmp_path / "model")
    path = folder / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(OSError, match=f"^{path}: .*{message}"):
        SwitchForConditionalGeneration.from_pretrained(folder)


def test_a_missing_shard_is_named(saved, tmp_path):
    saved[0].save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        SwitchForConditionalGeneration.from_pretrained(tmp_path)


def test_a_sharded_checkpoint_with_a_truncated_shard_names_that_shard(saved, tmp_path):
    saved[0].save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(OSError, match=f"^{shard}: truncated safetensors file"):
        SwitchForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize("removed", [ROUTER_KEY, EXPERT_KEY, "encoder.block.0.layer.0.SelfAttention.q.weight"])
def test_a_missing_weight_is_an_error_not_a_random_init(saved, tmp_path, removed):
    folder = _copy(saved[1], tmp_path / "model")
    _rewrite_weights(folder, lambda state: state.pop(removed))
    with pytest.raises(ValueError, match=rf"the checkpoint does not fit the model: it lacks 1 weights \({removed}\)"):
        SwitchForConditionalGeneration.from_pretrained(folder)


def test_an_unexpected_router_weight_is_an_error_and_other_extra_keys_only_a_warning(saved, tmp_path):
    folder = _copy(saved[1], tmp_path / "model")
    _rewrite_weights(folder, lambda state: state.update({"extra.scale": torch.ones(1)}))
    model, info = SwitchForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert info["unexpected_keys"] == {"extra.scale"}
    _assert_same_weights(model, saved[0])
    # A router where the config places a dense layer: the checkpoint and the config disagree on sparse layers.
    extra_router = "encoder.block.0.layer.1.mlp.router.classifier.weight"
    _rewrite_weights(folder, lambda state: state.update({extra_router: torch.zeros(4, 16)}))
    with pytest.raises(ValueError, match=f"1 router or expert weights the config places nowhere \\({extra_router}\\)"):
        SwitchForConditionalGeneration.from_pretrained(folder)


def test_a_config_with_another_expert_count_than_the_weights_is_refused(saved, tmp_path):
    folder = _copy(saved[1], tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_experts": 8}))
    # transformers refuses shape mismatches and logs a table of the keys and shapes.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        SwitchForConditionalGeneration.from_pretrained(folder)


def test_a_config_with_more_sparse_layers_than_the_weights_is_refused(saved, tmp_path):
    folder = _copy(saved[1], tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_sparse_encoder_layers": 2}))
    with pytest.raises(ValueError, match=r"it lacks 3 weights \(encoder\.block\.0\.layer\.1\.mlp\.experts\.wi"):
        SwitchForConditionalGeneration.from_pretrained(folder)


def test_an_integer_tensor_in_place_of_a_weight_is_refused_naming_file_and_key(saved, tmp_path):
    folder = _copy(saved[1], tmp_path / "model")
    _rewrite_weights(folder, lambda state: state.update({EXPERT_KEY: state[EXPERT_KEY].to(torch.int32)}))
    with pytest.raises(ValueError, match=f"model.safetensors: {EXPERT_KEY} is stored as I32, but the model's weight"):
        SwitchForConditionalGeneration.from_pretrained(folder)


def test_a_bfloat16_checkpoint_loads_cast_or_as_stored(tmp_path):
    tiny_model().to(torch.bfloat16).save_pretrained(tmp_path)
    as_stored = SwitchForConditionalGeneration.from_pretrained(tmp_path, dtype="auto")
    cast = SwitchForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    assert as_stored.dtype == torch.bfloat16 and cast.dtype == torch.float32
    assert torch.equal(
        cast.encoder.block[1].layer[1].mlp.experts.wi, as_stored.encoder.block[1].layer[1].mlp.experts.wi.float()
    )


def test_the_encoder_alone_loads_from_a_full_checkpoint(saved):
    encoder = SwitchEncoderModel.from_pretrained(saved[1])
    assert torch.equal(
        encoder.encoder.block[1].layer[1].mlp.router.classifier.weight, saved[0].state_dict()[ROUTER_KEY]
    )


def test_a_save_into_an_existing_folder_keeps_its_other_files_and_drops_stale_shards(saved, tmp_path):
    saved[0].save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "optimizer.pt").write_bytes(b"state")
    replacement = tiny_model(seed=1)
    replacement.save_pretrained(tmp_path)
    names = {path.name for path in tmp_path.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "checkpoint-1"}
    assert (tmp_path / "checkpoint-1" / "optimizer.pt").read_bytes() == b"state"
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*")), "no staging or previous folder is left behind"
    _assert_same_weights(replacement, SwitchForConditionalGeneration.from_pretrained(tmp_path))


# Saves a different model into argv[1], with the weight writer stalled mid-file: it writes half of the file, touches
# argv[2] so that the test knows, and sleeps until the test kills the process.
KILLED_SAVE = """
import pathlib, sys, time
import transformers.modeling_utils as modeling_utils
from safetensors.torch import save as serialize

def stalled_write(tensors, filename, metadata=None):
    data = serialize(tensors, metadata=metadata)
    pathlib.Path(filename).write_bytes(data[: len(data) // 2])
    pathlib.Path(sys.argv[2]).touch()
    time.sleep(600)

modeling_utils.safe_save_file = stalled_write
sys.path.insert(0, sys.argv[3])
from conftest import tiny_model
tiny_model(seed=1).save_pretrained(sys.argv[1])
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable_bit_exactly(saved, tmp_path):
    target, signal_file = tmp_path / "model", tmp_path / "writing"
    saved[0].save_pretrained(target)
    tests_dir = os.path.dirname(__file__)
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target), str(signal_file), tests_dir])
    try:
        deadline = time.monotonic() + 120
        while not signal_file.exists():
            assert process.poll() is None, "the saving process ended before it started writing weights"
            assert time.monotonic() < deadline, "the saving process never started writing weights"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    (staging,) = tmp_path.glob(".model.saving-*")  # the interrupted save, half written, beside the folder
    assert (staging / "model.safetensors").stat().st_size < (target / "model.safetensors").stat().st_size
    _assert_same_weights(saved[0], SwitchForConditionalGeneration.from_pretrained(target))
