"""Checkpoint files: atomic folder swaps on save, and checks of what a load reads.

Used by `SwitchPreTrainedModel.save_pretrained` / `from_pretrained`. Standard library only, since it travels with
the model as remote code.
"""

import json
import os
import shutil
from pathlib import Path


def _is_weight_file(name: str) -> bool:
    """Whether `save_pretrained` writes files of this name (weights, shards, their index)."""
    return name.startswith(("model", "pytorch_model")) and name.endswith((".safetensors", ".bin", ".index.json"))


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(source, destination, follow_symlinks=False)


def swap_into_place(staging: Path, target: Path) -> None:
    """Make the complete folder `staging` the folder `target` by renames, keeping `target`'s other files."""
    if not target.exists():
        staging.rename(target)
        return
    for entry in target.iterdir():
        if (staging / entry.name).exists() or _is_weight_file(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, staging / entry.name)
    previous = target.with_name(staging.name.replace(".saving-", ".previous-"))
    target.rename(previous)
    staging.rename(target)
    shutil.rmtree(previous)


def read_safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file, checked against the file's size; errors name the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        raw_header = handle.read(header_length) if 8 + header_length <= size else b""
    try:
        header = json.loads(raw_header)
        data_length = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise OSError(
            f"{path}: truncated or corrupted safetensors file: its {size:,} bytes do not start with a readable "
            "header. Save or download it again."
        ) from None
    expected = 8 + header_length + data_length
    if size != expected:
        state = "truncated" if size < expected else "corrupted"
        raise OSError(
            f"{path}: {state} safetensors file: it holds {size:,} bytes where its header describes {expected:,}. "
            "Save or download it again."
        )
    return header


def check_stored_dtypes(path: str, header: dict, model_dtypes: dict) -> None:
    """Refuse a non-floating tensor stored for a floating-point weight (a float dtype is cast as transformers does)."""
    for name, entry in header.items():
        dtype = model_dtypes.get(name)
        if dtype is not None and dtype.is_floating_point and not entry["dtype"].startswith(("F", "BF")):
            raise ValueError(
                f"{path}: {name} is stored as {entry['dtype']}, but the model's weight is floating point ({dtype}); "
                "the file is corrupted or not a Switch checkpoint."
            )


def _is_routing_weight(key: str) -> bool:
    return ".mlp.router." in key or ".mlp.experts." in key


def _listed(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def verify_loaded_keys(loading_info: dict, source) -> None:
    """Raise when a checkpoint lacks weights of the model or holds routing weights the config places nowhere."""
    missing = sorted(key for key in loading_info["missing_keys"] if not key.startswith("lm_head."))
    unexpected = sorted(key for key in loading_info["unexpected_keys"] if _is_routing_weight(key))
    problems = [f"it lacks {len(missing)} weights ({_listed(missing)})"] if missing else []
    if unexpected:
        problems.append(
            f"it holds {len(unexpected)} router or expert weights the config places nowhere ({_listed(unexpected)})"
        )
    if problems:
        raise ValueError(
            f"{source}: the checkpoint does not fit the model: {'; '.join(problems)}. Check num_layers, num_experts "
            "and num_sparse_encoder_layers/num_sparse_decoder_layers in its config.json against its weights, or save "
            "it again."
        )
