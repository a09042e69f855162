"""Precision, recall and F1 per class, macro-averaged (every class counts the same) and micro-averaged."""

import datasets
import evaluate


def prf(tp, fp, fn):
    """Precision, recall and F1 from true positive, false positive and false negative counts (0 when undefined)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Precision, recall and F1: macro and micro averages over classes.",
            citation="",
            inputs_description="predictions, references: class ids; num_labels: the number of classes",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_labels=None):
        classes = range(num_labels if num_labels is not None else max([*predictions, *references], default=-1) + 1)
        counts = {c: [0, 0, 0] for c in classes}  # tp, fp, fn
        for p, r in zip(predictions, references, strict=True):
            if p == r:
                counts[r][0] += 1
            else:
                counts[p][1] += 1
                counts[r][2] += 1
        per_class = [prf(*counts[c]) for c in classes]
        macro = [sum(v[i] for v in per_class) / max(len(per_class), 1) for i in range(3)]
        micro = prf(*(sum(counts[c][i] for c in classes) for i in range(3)))
        return {
            "macro_precision": macro[0],
            "macro_recall": macro[1],
            "macro_f1": macro[2],
            "micro_precision": micro[0],
            "micro_recall": micro[1],
            "micro_f1": micro[2],
        }
