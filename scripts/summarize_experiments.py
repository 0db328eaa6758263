"""Print the results table of scripts/experiments.sh: one row per run folder under the given root."""

import json
import sys
from pathlib import Path

COLUMNS = (
    ("eval_loss", "eval loss"),
    ("eval_bleu", "BLEU"),
    ("eval_chrf", "chrF"),
    ("eval_rouge1", "ROUGE-1"),
    ("eval_rouge2", "ROUGE-2"),
    ("eval_rougeL", "ROUGE-L"),
    ("train_tokens_per_second", "train tokens/s"),
    ("train_steps_per_second", "steps/s"),
)


def main(root: Path) -> None:
    runs = sorted(path.parent for path in root.glob("*/eval_results.json"))
    print("| run | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for run in runs:
        results = {
            **json.loads((run / "train_results.json").read_text()),
            **json.loads((run / "eval_results.json").read_text()),
        }
        cells = [f"{results[key]:.4g}" if key in results else "" for key, _ in COLUMNS]
        print(f"| {run.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
