"""Print the results table of scripts/experiments.sh: one row per run folder under the given root."""

import json
import math
import sys
from pathlib import Path

from safetensors import safe_open

COLUMNS = (
    ("eval_loss", "eval loss"),
    ("eval_bleu", "BLEU"),
    ("eval_chrf", "chrF"),
    ("eval_rouge1", "ROUGE-1"),
    ("eval_rouge2", "ROUGE-2"),
    ("eval_rougeL", "ROUGE-L"),
    ("train_tokens_per_second", "train tokens/s"),
    ("seconds_per_step", "s/step"),
    ("trainable_share", "trained params"),
)


def _parameter_count(path: Path) -> int:
    with safe_open(path, "pt") as checkpoint:
        return sum(math.prod(checkpoint.get_slice(key).get_shape()) for key in checkpoint.keys())


def _trainable_share(run: Path) -> float:
    """LoRA runs: adapter parameters over base-model parameters; full training: 1."""
    adapter = run / "adapter_model.safetensors"
    if not adapter.exists():
        return 1.0
    base = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    return _parameter_count(adapter) / _parameter_count(Path(base) / "model.safetensors")


def results(run: Path) -> dict:
    state = json.loads((run / "trainer_state.json").read_text())
    train = json.loads((run / "train_results.json").read_text())
    return {
        **train,
        **json.loads((run / "eval_results.json").read_text()),
        "seconds_per_step": train["train_runtime"] / state["global_step"],
        "train_tokens_per_second": train.get("num_input_tokens_seen", math.nan) / train["train_runtime"],
        "trainable_share": _trainable_share(run),
    }


def main(root: Path) -> None:
    print("| run | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for run in sorted(path.parent for path in root.glob("*/eval_results.json")):
        row = results(run)
        print(f"| {run.name} | " + " | ".join(f"{row[key]:.4g}" if key in row else "" for key, _ in COLUMNS) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
