"""From a saved seq2seq model to predictions and scores: `hf-switch predict`, and `--do_predict` in training runs.

Works on any `AutoModelForSeq2SeqLM` folder: a Switch model, a dense T5 (a distilled student, a baseline), or a
folder published with remote code. Generation uses the folder's own `generation_config.json` (length, beams, special
ids) and the source prefix the model was trained with (`config.prefix`), each overridable.
"""

import argparse
import gzip
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .training.metrics import load_metrics, rounded_scores

DEFAULT_METRICS = "bleu,chrf"
GENERATION_FLAGS = ("num_beams", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k")


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_texts(path: str, column: str, name: str) -> list[str]:
    """One text per line of a text file, or the `column` of each JSON line (`.jsonl`, `.json`; `.gz` ok); `-` reads
    stdin as text lines. An empty text is an error that names the file and line: it would be predicted from nothing
    and shift nothing, but a blank line in a parallel file usually means the files are misaligned."""
    if path == "-":
        lines, where = sys.stdin.read().splitlines(), "stdin"
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"{name}: no file at {path!r}.")
        with _open_text(file) as handle:
            lines, where = handle.read().splitlines(), path
    json_lines = path != "-" and any(suffix in (".jsonl", ".json") for suffix in Path(path).suffixes)
    texts = []
    for number, line in enumerate(lines, start=1):
        if json_lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{name}: {where} line {number} is not a JSON object ({error.msg}).") from None
            if not isinstance(row, dict) or column not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{name}: {where} line {number} has no {column!r} field (it has {keys}).")
            line = row[column]
        if not isinstance(line, str) or not line.strip():
            raise ValueError(f"{name}: {where} line {number} is empty; every line must hold a text.")
        texts.append(line)
    if not texts:
        raise ValueError(f"{name}: {where} holds no text.")
    return texts


def check_references(sources: list[str], references: list[str], where: str) -> None:
    if len(references) != len(sources):
        raise ValueError(
            f"{where}: {len(references)} references for {len(sources)} sources; they must pair up line by line."
        )


def generate_predictions(
    model,
    tokenizer,
    sources: list[str],
    prefix: str = "",
    batch_size: int = 64,
    max_source_length: int | None = None,
    progress: bool = True,
    **generation,
) -> list[str]:
    """Generated texts for `sources`, in their order.

    Batches hold sources of similar token length (longest first, so that running out of memory shows at once), so
    little of a batch is padding; `generation` overrides the model's generation config (`num_beams=4`, ...).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: it must be a positive integer.")
    truncation = max_source_length is not None
    encoded = tokenizer([prefix + text for text in sources], truncation=truncation, max_length=max_source_length)
    order = sorted(range(len(sources)), key=lambda index: -len(encoded["input_ids"][index]))
    device = model.device
    predictions: list[str] = [""] * len(sources)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for indices in tqdm(batches, desc="predict", unit="batch", disable=not progress):
        features = [{key: values[index] for key, values in encoded.items()} for index in indices]
        batch = tokenizer.pad(features, return_tensors="pt").to(device)
        with torch.no_grad():
            generated = model.generate(**batch, **generation)
        for index, text in zip(indices, tokenizer.batch_decode(generated, skip_special_tokens=True), strict=True):
            predictions[index] = text.strip()
    return predictions


def score_predictions(predictions: list[str], references: list[str], metrics: str = DEFAULT_METRICS) -> dict:
    """Scores of `predictions` against the raw reference texts through the package's `evaluate` modules, with
    sacreBLEU's signature for BLEU and chrF (`bleu_signature`, ...)."""
    return rounded_scores(load_metrics(metrics), predictions, references)


def write_atomically(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and a rename: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def format_predictions(predictions: list[str], sources: list[str], path: str | None) -> str:
    """JSON lines (`source`, `prediction`) for a `.jsonl` path; otherwise one prediction per line, a line break
    inside a prediction written as a space so that line N stays the prediction of input N."""
    if path is not None and path.endswith(".jsonl"):
        pairs = zip(sources, predictions, strict=True)
        return "".join(json.dumps({"source": s, "prediction": p}, ensure_ascii=False) + "\n" for s, p in pairs)
    return "".join(" ".join(prediction.splitlines()) + "\n" for prediction in predictions)


def load_for_prediction(folder: str, trust_remote_code: bool = False, device: str | None = None):
    """`(model, tokenizer)` of a saved seq2seq folder, in eval mode on `device` (default: the accelerator if any).

    A LoRA adapter folder (`hf-switch finetune`'s output) is loaded onto the base model its `adapter_config.json`
    names and merged into it.
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from .training.arguments import check_model_folder_or_hub_id

    adapter_config = Path(folder, "adapter_config.json")
    if adapter_config.is_file():
        from .lora import load_adapter

        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter_config} names no base_model_name_or_path: the adapter's base model is unknown.")
        check_model_folder_or_hub_id(base, f"the adapter's base model (base_model_name_or_path in {adapter_config})")
        base_model = AutoModelForSeq2SeqLM.from_pretrained(base, trust_remote_code=trust_remote_code)
        model = load_adapter(base_model, folder).merge_and_unload()
    else:
        check_model_folder_or_hub_id(folder, "model")
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if device is None:
        device = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-switch predict",
        description="Translate or summarise a file with a saved model; with --references, score the predictions.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", help="a saved seq2seq folder (Switch or T5), a LoRA adapter folder, or a Hub id")
    parser.add_argument(
        "input", nargs="?", default="-", help="sources: a text file (one per line), JSON lines (.jsonl), or - for stdin"
    )
    parser.add_argument("--output", help="predictions file (.jsonl: source and prediction per line); default: stdout")
    parser.add_argument("--references", help="reference file, same formats as input: score the predictions")
    parser.add_argument("--results", help="write the scores as JSON here (default: OUTPUT's name + .metrics.json)")
    parser.add_argument("--metrics", default=DEFAULT_METRICS, help="comma-separated: bleu, chrf, rouge")
    parser.add_argument("--source_column", default="source", help="JSON field of the sources")
    parser.add_argument("--target_column", default="target", help="JSON field of the references")
    parser.add_argument("--source_prefix", help="prefix for every source (default: the model's saved config.prefix)")
    parser.add_argument("--max_source_length", type=int, help="truncate sources to this many tokens")
    parser.add_argument("--batch_size", type=int, default=64, help="sources per generate() call")
    generation = parser.add_argument_group("generation (default: the folder's generation_config.json)")
    generation.add_argument("--num_beams", type=int)
    generation.add_argument("--max_new_tokens", type=int)
    generation.add_argument("--do_sample", action="store_true", default=None)
    generation.add_argument("--temperature", type=float)
    generation.add_argument("--top_p", type=float)
    generation.add_argument("--top_k", type=int)
    parser.add_argument("--device", help="cpu, cuda, ... (default: the accelerator if any)")
    parser.add_argument("--trust_remote_code", action="store_true", help="load a folder published with remote code")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def predict_main(argv: list[str] | None = None) -> dict:
    """`hf-switch predict`: returns the scores (empty without --references)."""
    arguments = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    sources = read_texts(arguments.input, arguments.source_column, "input")
    references = None
    if arguments.references is not None:
        references = read_texts(arguments.references, arguments.target_column, "--references")
        check_references(sources, references, f"--references {arguments.references}")
    elif arguments.results is not None:
        raise ValueError("--results holds scores, which need --references.")
    model, tokenizer = load_for_prediction(arguments.model, arguments.trust_remote_code, arguments.device)
    prefix = arguments.source_prefix
    if prefix is None:
        prefix = getattr(model.config, "prefix", None) or ""
    generation = {flag: getattr(arguments, flag) for flag in GENERATION_FLAGS if getattr(arguments, flag) is not None}
    predictions = generate_predictions(
        model,
        tokenizer,
        sources,
        prefix=prefix,
        batch_size=arguments.batch_size,
        max_source_length=arguments.max_source_length,
        progress=not arguments.quiet,
        **generation,
    )
    text = format_predictions(predictions, sources, arguments.output)
    if arguments.output is None:
        sys.stdout.write(text)
    else:
        write_atomically(arguments.output, text)
    if references is None:
        return {}
    scores = score_predictions(predictions, references, arguments.metrics)
    results = arguments.results or (f"{arguments.output}.metrics.json" if arguments.output else None)
    if results is not None:
        write_atomically(results, json.dumps(scores, indent=1) + "\n")
    summary = ", ".join(f"{name} {value}" for name, value in scores.items() if not name.endswith("_signature"))
    print(f"hf-switch predict: {len(predictions)} predictions; {summary}", file=sys.stderr)
    return scores


__all__ = [
    "check_references",
    "format_predictions",
    "generate_predictions",
    "load_for_prediction",
    "predict_main",
    "read_texts",
    "score_predictions",
    "write_atomically",
]
