"""Accuracy: the share of predictions equal to their reference."""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="The share of predictions equal to their reference.",
            citation="",
            inputs_description="predictions, references: class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        if not references:
            return {"accuracy": 0.0}
        return {"accuracy": sum(int(p == r) for p, r in zip(predictions, references, strict=True)) / len(references)}
