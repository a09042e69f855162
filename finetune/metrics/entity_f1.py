"""Entity-level precision, recall and F1 from BIO tags (as seqeval/conlleval): an entity counts when its type
and its exact extent match. Per type and micro-averaged over all entities."""

import datasets
import evaluate

from berth.finetune.bio import bio_spans
from berth.finetune.metrics.f1 import prf


class EntityF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Entity-level precision, recall and F1 from BIO tags, per type and micro-averaged.",
            citation="",
            inputs_description="predictions, references: one list of BIO tag strings per sentence",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references):
        counts = {}  # type -> [tp, fp, fn]
        for pred, ref in zip(predictions, references, strict=True):
            if len(pred) != len(ref):
                raise ValueError(f"a prediction has {len(pred)} tags and its reference {len(ref)}")
            found, gold = set(bio_spans(pred)), set(bio_spans(ref))
            for kind, *_ in found | gold:
                counts.setdefault(kind, [0, 0, 0])
            for kind, *_ in found & gold:
                counts[kind][0] += 1
            for kind, *_ in found - gold:
                counts[kind][1] += 1
            for kind, *_ in gold - found:
                counts[kind][2] += 1
        result = {}
        for kind in sorted(counts):
            p, r, f = prf(*counts[kind])
            result.update(
                {f"{kind}_precision": p, f"{kind}_recall": r, f"{kind}_f1": f, f"{kind}_number": sum(counts[kind][::2])}
            )
        p, r, f = prf(*(sum(c[i] for c in counts.values()) for i in range(3)))
        result.update({"precision": p, "recall": r, "f1": f})
        return result
