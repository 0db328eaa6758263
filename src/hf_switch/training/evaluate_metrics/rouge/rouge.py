"""ROUGE-1/2/L/Lsum F-measures (x100, averaged over examples) from rouge_score, as a local `evaluate` metric."""

import datasets
import evaluate
from rouge_score import rouge_scorer, scoring

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="rouge_score F-measures with stemming, averaged over examples.",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        aggregator = scoring.BootstrapAggregator()
        for prediction, reference in zip(predictions, references, strict=True):
            # rougeLsum splits summaries into sentences on newlines.
            aggregator.add_scores(scorer.score(reference.replace(". ", ".\n"), prediction.replace(". ", ".\n")))
        result = aggregator.aggregate()
        return {name: result[name].mid.fmeasure * 100 for name in ROUGE_TYPES}
