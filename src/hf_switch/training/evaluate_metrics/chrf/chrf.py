"""Corpus chrF from sacrebleu, as a local `evaluate` metric."""

import datasets
import evaluate
import sacrebleu


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="sacrebleu corpus chrF, one reference per prediction.",
            citation="Popovic, chrF: character n-gram F-score for automatic MT evaluation, WMT 2015.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        metric = sacrebleu.metrics.CHRF()
        score = metric.corpus_score(predictions, [references])
        return {"chrf": score.score, "chrf_signature": str(metric.get_signature())}
