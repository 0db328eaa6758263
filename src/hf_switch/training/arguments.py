"""Arguments of `hf-switch train`: model and data dataclasses beside transformers' `Seq2SeqTrainingArguments`."""

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..configuration_switch import SwitchConfig

# Model sizes. "tiny" is for tests, "mini" for the embedded default job and the CPU experiments (minutes on a laptop),
# "small" for a workstation; the "base" ones follow the paper's shapes.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, num_experts=4),
    "mini": dict(d_model=128, d_kv=32, d_ff=512, num_layers=4, num_heads=4, num_experts=8),
    "small": dict(d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8, num_experts=8),
    "base-8": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, num_experts=8),
    "base-16": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, num_experts=16),
}


def did_you_mean(name: str, choices, otherwise: str) -> str:
    """ "did you mean X or Y?" with the choices closest to a mistyped `name`, else `otherwise`."""
    close = difflib.get_close_matches(name, choices, n=3)
    return f"did you mean {' or '.join(close)}?" if close else otherwise


def check_folder_or_hub_id(text: str, name: str) -> str:
    """`text` if it is a local folder or can be a Hub id (`name` or `org/name`), else a `FileNotFoundError` naming
    `name`, raised before any Hub call. An `org/name` whose `org` is a local folder is taken for a mistyped path."""
    path = Path(text).expanduser()
    if path.is_dir():
        return text
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text) or text.startswith("."):
        raise FileNotFoundError(
            f"{name}: no folder at {text!r}, and it is not a Hub id such as 'google/switch-base-8'."
        )
    if "/" in text and path.parent.is_dir():
        raise FileNotFoundError(
            f"{name}: no folder at {text!r} ({str(path.parent)!r} is a local folder, so this is read as a path, not a "
            "Hub id)."
        )
    return text


def check_model_folder_or_hub_id(text: str, name: str) -> str:
    """`check_folder_or_hub_id`, and a local folder must hold a `config.json`."""
    check_folder_or_hub_id(text, name)
    if Path(text).expanduser().is_dir() and not Path(text, "config.json").expanduser().is_file():
        raise FileNotFoundError(f"{name}: {text!r} holds no config.json, so it is not a saved model folder.")
    return text


@dataclass
class ModelArguments:
    """Which model to train: a size preset, a saved folder, or a dense T5 to upcycle."""

    _argument_group_name = "model"

    preset: str = field(default="mini", metadata={"help": f"size preset, one of {sorted(PRESETS)}"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a saved hf_switch or transformers SwitchTransformers folder (or Hub id)"}
    )
    upcycle_from: str | None = field(
        default=None, metadata={"help": "a dense T5 folder or Hub id to upcycle into a Switch model"}
    )
    architecture: Literal["switch", "t5"] = field(
        default="switch",
        metadata={
            "help": "'t5' trains a dense T5ForConditionalGeneration: the preset's dims (a baseline with the same "
            "compute per token), or the T5 folder --model_name_or_path"
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "comma-separated SwitchConfig fields, e.g. 'num_experts=16,capacity_factor=1.0'"},
    )
    expert_parallel_size: int | None = field(
        default=None,
        metadata={
            "help": "ranks that share one copy of the experts (DeepSpeed expert parallelism; needs --deepspeed or an "
            "accelerate DeepSpeed config); default: the DeepSpeed config's moe.expert_parallel_size, else the model's"
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "a tokenizer folder or Hub id; default: the model folder's, else trained"}
    )
    tokenizer_vocab_size: int = field(
        default=8000, metadata={"help": "vocabulary size of a tokenizer trained on the training text"}
    )

    def __post_init__(self):
        for name in ("model_name_or_path", "upcycle_from"):
            if getattr(self, name) is not None:
                check_model_folder_or_hub_id(getattr(self, name), f"--{name}")
        if self.tokenizer_name_or_path is not None:
            check_folder_or_hub_id(self.tokenizer_name_or_path, "--tokenizer_name_or_path")


@dataclass
class DataArguments:
    """What to train on. With no data argument at all, the embedded offline default is used."""

    _argument_group_name = "data"

    objective: Literal["span_corruption", "seq2seq"] = field(
        default="span_corruption", metadata={"help": "T5 span-corruption pretraining or source->target finetuning"}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "a dataset on the Hub"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "the Hub dataset's configuration"})
    train_file: str | None = field(default=None, metadata={"help": "a .txt, .json, .jsonl or .csv file (.gz ok)"})
    validation_file: str | None = field(default=None, metadata={"help": "same formats as train_file"})
    train_source_file: str | None = field(default=None, metadata={"help": "parallel line file: sources"})
    train_target_file: str | None = field(default=None, metadata={"help": "parallel line file: targets"})
    validation_source_file: str | None = field(default=None, metadata={"help": "parallel line file: sources"})
    validation_target_file: str | None = field(default=None, metadata={"help": "parallel line file: targets"})
    test_file: str | None = field(
        default=None, metadata={"help": "with --do_predict: predicted after training; same formats as train_file"}
    )
    test_source_file: str | None = field(default=None, metadata={"help": "with --do_predict: test sources"})
    test_target_file: str | None = field(default=None, metadata={"help": "with --do_predict: test references"})
    text_column: str = field(default="text", metadata={"help": "column of raw text (span corruption)"})
    source_column: str = field(default="source", metadata={"help": "column of sources (seq2seq)"})
    target_column: str = field(default="target", metadata={"help": "column of targets (seq2seq)"})
    source_prefix: str = field(default="", metadata={"help": "task prefix, e.g. 'translate English to German: '"})
    max_source_length: int = field(default=128, metadata={"help": "input tokens per example"})
    max_target_length: int = field(default=128, metadata={"help": "target tokens per example (seq2seq)"})
    noise_density: float = field(default=0.15, metadata={"help": "fraction of tokens corrupted"})
    mean_noise_span_length: float = field(default=3.0, metadata={"help": "mean length of corrupted spans"})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "held-out share of the training data when no validation data is given"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "truncate the training set"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "truncate the validation set"})
    metrics: str = field(
        default="bleu,chrf,rouge", metadata={"help": "generation metrics with --predict_with_generate (seq2seq)"}
    )

    @property
    def has_test_data(self) -> bool:
        return any((self.test_file, self.test_source_file, self.test_target_file))

    @property
    def uses_embedded_default(self) -> bool:
        return not any(
            (
                self.dataset_name,
                self.train_file,
                self.train_source_file,
                self.validation_file,
                self.validation_source_file,
            )
        )


def parse_config_overrides(overrides: str | None) -> dict:
    """'num_experts=16,capacity_factor=None' -> {'num_experts': 16, 'capacity_factor': None}, typed by SwitchConfig."""
    if not overrides:
        return {}
    fields = [name for name in SwitchConfig.__dataclass_fields__ if not name.startswith("_")]
    parsed = {}
    for item in overrides.split(","):
        name, separator, text = item.partition("=")
        name = name.strip()
        if not separator:
            raise ValueError(f"--config_overrides: {item!r} is not 'field=value'.")
        if name not in fields:
            hint = did_you_mean(name, fields, otherwise="see `help(hf_switch.SwitchConfig)` for the fields.")
            raise ValueError(f"--config_overrides: {name!r} is not a SwitchConfig field; {hint}")
        parsed[name] = _parse_value(text.strip())
    return parsed


def _parse_value(text: str):
    if text in ("None", "null"):
        return None
    if text in ("True", "true", "False", "false"):
        return text in ("True", "true")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def resolve_expert_parallel_size(flag: int | None, deepspeed_config: dict | None) -> int | None:
    """The run's expert-parallel size: `--expert_parallel_size`, else the DeepSpeed config's
    `"moe": {"expert_parallel_size": p}` section, else `None` (the model's own)."""
    section = (deepspeed_config or {}).get("moe", {})
    unknown = sorted(set(section) - {"expert_parallel_size"})
    if unknown:
        raise ValueError(f"DeepSpeed config moe section: unknown keys {unknown}; it takes only 'expert_parallel_size'.")
    from_config = section.get("expert_parallel_size")
    if flag is not None and from_config is not None and flag != from_config:
        raise ValueError(
            f"--expert_parallel_size={flag} contradicts the DeepSpeed config's moe.expert_parallel_size={from_config}: "
            "give one of them, or the same value."
        )
    size = flag if flag is not None else from_config
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"expert_parallel_size={size!r} is invalid: it must be a positive integer.")
    return size
