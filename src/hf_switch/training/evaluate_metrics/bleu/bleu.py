"""Corpus BLEU from sacrebleu, as a local `evaluate` metric (the Hub's script cannot be fetched offline)."""

import datasets
import evaluate
import sacrebleu


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="sacrebleu corpus BLEU (13a tokenisation), one reference per prediction.",
            citation="Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        metric = sacrebleu.metrics.BLEU()
        score = metric.corpus_score(predictions, [references])
        return {"bleu": score.score, "bleu_signature": str(metric.get_signature())}
