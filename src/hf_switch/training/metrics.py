"""Generation metrics through `evaluate`, loaded from the metric modules shipped in this package."""

from pathlib import Path

import evaluate
import numpy as np

METRICS_FOLDER = Path(__file__).parent / "evaluate_metrics"
AVAILABLE = tuple(sorted(path.name for path in METRICS_FOLDER.iterdir() if (path / f"{path.name}.py").is_file()))


def load_metrics(names: str) -> evaluate.CombinedEvaluations:
    """`evaluate.combine` of the comma-separated metric names, e.g. 'bleu,chrf,rouge'."""
    requested = [name.strip() for name in names.split(",") if name.strip()]
    unknown = sorted(set(requested) - set(AVAILABLE))
    if unknown or not requested:
        raise ValueError(f"--metrics={names!r}: choose from {AVAILABLE}, comma-separated (unknown: {unknown}).")
    return evaluate.combine([evaluate.load(str(METRICS_FOLDER / name)) for name in requested])


def rounded_scores(metrics: evaluate.CombinedEvaluations, predictions: list[str], references: list[str]) -> dict:
    """`metrics` of `predictions` against `references`, numbers rounded to 4 decimals; sacreBLEU's signatures
    (`bleu_signature`, `chrf_signature`) kept as strings."""
    scores = metrics.compute(predictions=predictions, references=references)
    return {name: value if isinstance(value, str) else round(float(value), 4) for name, value in scores.items()}


def generation_metrics(tokenizer, names: str, references: list[str] | None = None):
    """A `compute_metrics` for `Seq2SeqTrainer` with `predict_with_generate`: decode, then score.

    With `references` (the evaluation set's raw target texts, in its order) the predictions are scored against
    them, as sacreBLEU on the files would; without, against the labels decoded back (normalised by the tokenizer,
    truncated to the target length, unknown characters lost).
    """
    metrics = load_metrics(names)

    def compute_metrics(evaluation) -> dict[str, float]:
        predictions, labels = evaluation.predictions, evaluation.label_ids
        if references is not None:
            predictions, labels = _without_repeats(predictions, labels, len(references))
        predictions = np.where(predictions < 0, tokenizer.pad_token_id, predictions)
        decoded_predictions = [text.strip() for text in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        if references is None:
            labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
            targets = [text.strip() for text in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        elif len(references) != len(decoded_predictions):
            raise ValueError(
                f"generation_metrics: {len(decoded_predictions)} predictions for {len(references)} references; "
                "it scores the evaluation set it was given the references of."
            )
        else:
            targets = references
        # The Trainer logs every value it gets; the signatures are strings, which its loggers cannot plot.
        scores = rounded_scores(metrics, decoded_predictions, targets)
        scores = {name: value for name, value in scores.items() if not name.endswith("_signature")}
        lengths = [np.count_nonzero(row != tokenizer.pad_token_id) for row in predictions]
        return {**scores, "gen_len": float(np.mean(lengths))}

    return compute_metrics


def _without_repeats(predictions: np.ndarray, labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` rows of `predictions` and `labels`, when the rows beyond are repeats of the first samples.

    Several processes evaluate in even batches: accelerate fills the last ones with the evaluation set's first
    samples again, and Seq2SeqTrainer gathers those repeats too (`accelerator.gather`), after the `count` samples.
    When the rows beyond are not repeats (their labels differ), every row is returned, for the caller to refuse.
    """
    extra = len(predictions) - count
    if extra <= 0 or count == 0:
        return predictions, labels
    if not np.array_equal(labels[count:], labels[np.arange(extra) % count]):
        return predictions, labels
    return predictions[:count], labels[:count]
