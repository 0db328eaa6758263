"""The paper's headline in miniature: Switch models against the T5 of the same dense dims, at equal steps.

    python scripts/headline.py train ROOT [--tasks translate span] [--runs t5 switch-8 ...]
        [--seeds 0 1 2] [--steps 3000] [--parallel 2]
    python scripts/headline.py report ROOT OUT     # tables (stdout, OUT/headline.json) and one PNG per task

Tasks, from ../shared/data: "translate", one model translating Multi30k English into German, French and Czech (a
target-language prefix on the source); "span", T5 span-corruption pretraining on NTREX-128 (about 115 languages).
Runs: "t5" (dense, the mini preset's dims), "switch-E" (E experts in every other layer, the mini preset otherwise;
E in 2, 8, 32). Every run has the same steps, batch, learning-rate schedule and seed, and the task's one tokenizer.
Each run is `hf-switch train` with checkpoints under ROOT; rerunning `train` resumes unfinished runs and skips
finished ones, so the experiment can span sessions. `report` reads finished and partial runs alike.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LANGUAGES = {"de": "German", "fr": "French", "cs": "Czech"}
RUNS = {
    "t5": ["--architecture", "t5"],
    **{f"switch-{e}": ["--config_overrides", f"num_experts={e}"] for e in (2, 8, 32)},
}
COMMON = [
    "--preset", "mini", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "128",
    "--learning_rate", "1e-3", "--warmup_steps", "100", "--lr_scheduler_type", "linear",
    "--eval_strategy", "steps", "--eval_steps", "250", "--save_steps", "250", "--save_total_limit", "1",
    "--logging_steps", "50", "--max_eval_samples", "1536", "--report_to", "tensorboard", "--disable_tqdm", "true",
]  # fmt: skip
TASKS = {
    "translate": [
        "--objective", "seq2seq", "--max_source_length", "48", "--max_target_length", "48",
        "--train_file", "{data}/train.jsonl", "--validation_file", "{data}/validation.jsonl",
    ],
    "span": [
        "--objective", "span_corruption", "--max_source_length", "128", "--train_file", "{data}/train.txt",
        "--validation_split_percentage", "2",
    ],
}  # fmt: skip


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def prepare_translation(folder: Path) -> list[str]:
    """Source/target JSON lines for en->{de,fr,cs}, languages interleaved so any prefix of a split mixes them."""
    multi30k = DATA / "multi30k"
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test_2016_flickr")):
        english = _lines(multi30k / f"{name}.en.gz")
        targets = {language: _lines(multi30k / f"{name}.{language}.gz") for language in LANGUAGES}
        rows = [
            {"source": f"English to {title}: {source}", "target": targets[language][i], "language": language}
            for i, source in enumerate(english)
            for language, title in LANGUAGES.items()
        ]
        _write_jsonl(folder / f"{split}.jsonl", rows)
    return english + [line for language in LANGUAGES for line in _lines(multi30k / f"train.{language}.gz")]


def prepare_span(folder: Path) -> list[str]:
    """Every NTREX-128 file's lines, one text file."""
    texts = [line for path in sorted((DATA / "ntrex128").glob("*.txt.gz")) for line in _lines(path) if line.strip()]
    (folder / "train.txt").write_text("\n".join(texts) + "\n")
    return texts


def prepare(root: Path, task: str) -> Path:
    """The task's data files and its shared tokenizer under ROOT/TASK/data (made once)."""
    from hf_switch.training.data import train_tokenizer

    folder = root / task / "data"
    if (folder / "tokenizer" / "tokenizer.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    texts = prepare_translation(folder) if task == "translate" else prepare_span(folder)
    train_tokenizer(texts, 8000 if task == "translate" else 16000).save_pretrained(folder / "tokenizer")
    return folder


def train_run(root: Path, task: str, run: str, seed: int, steps: int) -> str:
    data = root / task / "data"
    output = root / task / f"{run}-seed{seed}"
    if (output / "eval_results.json").exists():
        return f"{output}: done"
    arguments = [
        *COMMON,
        *(argument.format(data=data) for argument in TASKS[task]),
        *RUNS[run],
        "--tokenizer_name_or_path", str(data / "tokenizer"), "--seed", str(seed), "--max_steps", str(steps),
        "--output_dir", str(output),
    ]  # fmt: skip
    if any(output.glob("checkpoint-*")):
        arguments += ["--resume_from_checkpoint", "true"]
    output.mkdir(parents=True, exist_ok=True)
    commands = [["hf-switch", "train", *arguments]]
    if task == "translate":
        commands.append([sys.executable, __file__, "score", str(output), str(data)])
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(output / "train.log", "a") as log:
        for command in commands:
            returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment).returncode
            if returncode:
                return f"{output}: {command[1]} exited with {returncode}"
    return f"{output}: done"


def score_translation(run: Path, data: Path) -> None:
    """Greedy translations of the Multi30k 2016 test set; BLEU and chrF per target language -> test_scores.json."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import hf_switch  # noqa: F401  (registers the Auto classes)
    from hf_switch.training.metrics import load_metrics

    model = AutoModelForSeq2SeqLM.from_pretrained(run).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    predictions = []
    for start in range(0, len(rows), 128):
        batch = tokenizer([row["source"] for row in rows[start : start + 128]], return_tensors="pt", padding=True)
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=48, do_sample=False)
        predictions += [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    scores = {}
    for language in [*LANGUAGES, "all"]:
        chosen = [i for i, row in enumerate(rows) if language in ("all", row["language"])]
        metrics = load_metrics("bleu,chrf").compute(
            predictions=[predictions[i] for i in chosen], references=[rows[i]["target"] for i in chosen]
        )
        scores[language] = {name: round(float(value), 2) for name, value in metrics.items()}
    (run / "test_scores.json").write_text(json.dumps(scores, indent=1))


def _history(run: Path) -> list[dict]:
    """The run's log history: the finished run's, else its latest checkpoint's."""
    states = [run / "trainer_state.json", *sorted(run.glob("checkpoint-*/trainer_state.json"))]
    existing = [path for path in states if path.exists()]
    return json.loads(existing[0].read_text())["log_history"] if existing else []


def _reach_step(curve: list[tuple[float, float]], target: float) -> float | None:
    """First x at which a decreasing (x, loss) curve reaches `target`, linearly interpolated; None if never."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if y1 <= target:
            return x1 if y0 == y1 else x0 + (y0 - target) / (y0 - y1) * (x1 - x0)
    return None


def summarize(run: Path) -> dict:
    history = _history(run)
    evals = [entry for entry in history if "eval_loss" in entry]
    routing = run / "routing_stats.json"
    dropped = {}
    if routing.exists():
        last = json.loads(routing.read_text())["history"][-1]["layers"]
        dropped = {layer: round(stats["dropped_fraction"], 4) for layer, stats in last.items()}
    scores = run / "test_scores.json"
    return {
        "steps": [entry["step"] for entry in evals],
        "eval_loss": [entry["eval_loss"] for entry in evals],
        "train_seconds": [entry.get("train_seconds") for entry in evals],
        "finished": (run / "eval_results.json").exists(),
        "dropped_fraction": dropped,
        "test_scores": json.loads(scores.read_text()) if scores.exists() else None,
    }


def report(root: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for task in TASKS:
        runs = sorted(path for path in (root / task).glob("*-seed*") if path.is_dir())
        results[task] = {run.name: summarize(run) for run in runs}
        results[task] = {name: summary for name, summary in results[task].items() if summary["steps"]}
        if not results[task]:
            continue
        figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for name, summary in results[task].items():
            by_step.plot(summary["steps"], summary["eval_loss"], marker=".", label=name)
            by_time.plot(summary["train_seconds"], summary["eval_loss"], marker=".", label=name)
        by_step.set_xlabel("step")
        by_time.set_xlabel("training seconds (one thread, two runs at a time)")
        by_step.set_ylabel("validation loss")
        by_step.legend(fontsize=8)
        figure.suptitle(f"{task}: validation loss, Switch vs T5 (mini dims)")
        figure.tight_layout()
        figure.savefig(out / f"headline_{task}.png", dpi=120)
        plt.close(figure)
        _print_table(task, results[task])
    (out / "headline.json").write_text(json.dumps(results, indent=1))


def _print_table(task: str, runs: dict) -> None:
    print(f"\n{task}\n| run | steps | final eval loss | s/step | steps to T5's final loss | dropped (last log) |")
    print("|---|---|---|---|---|---|")
    for name, summary in runs.items():
        seed = name.rsplit("-seed", 1)[1]
        baseline = runs.get(f"t5-seed{seed}")
        reach = None
        if baseline and baseline["finished"] and not name.startswith("t5"):
            curve = list(zip(summary["steps"], summary["eval_loss"], strict=True))
            reach = _reach_step(curve, baseline["eval_loss"][-1])
        seconds = summary["train_seconds"][-1] / summary["steps"][-1] if summary["train_seconds"][-1] else np.nan
        dropped = ", ".join(f"{100 * value:.1f}" for value in summary["dropped_fraction"].values()) or "-"
        reach_text = "-" if reach is None else f"{reach:.0f} ({reach / baseline['steps'][-1]:.2f}x)"
        print(
            f"| {name} | {summary['steps'][-1]} | {summary['eval_loss'][-1]:.3f} | {seconds:.3f} | {reach_text} | "
            f"{dropped} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train")
    train.add_argument("root", type=Path)
    train.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    train.add_argument("--runs", nargs="+", choices=list(RUNS), default=["t5", "switch-8", "switch-32", "switch-2"])
    train.add_argument("--seeds", nargs="+", type=int, default=[0])
    train.add_argument("--steps", type=int, default=3000)
    train.add_argument("--parallel", type=int, default=2)
    summary = commands.add_parser("report")
    summary.add_argument("root", type=Path)
    summary.add_argument("out", type=Path)
    score = commands.add_parser("score", help="score one finished translate run (train does this)")
    score.add_argument("run", type=Path)
    score.add_argument("data", type=Path)
    args = parser.parse_args()
    if args.command == "report":
        return report(args.root, args.out)
    if args.command == "score":
        return score_translation(args.run, args.data)
    for task in args.tasks:
        prepare(args.root, task)
    jobs = [(task, run, seed) for seed in args.seeds for task in args.tasks for run in args.runs]
    with ThreadPoolExecutor(args.parallel) as pool:
        for line in pool.map(lambda job: train_run(args.root, *job, args.steps), jobs):
            print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
