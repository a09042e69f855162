"""Sequence classification: one label per text or text pair, long texts read in windows and combined per document.

How a text becomes windows is `berth.finetune.windows`, how windows become a document's logits
`berth.finetune.pooling`, the model `berth.finetune.modeling.WindowClassifier`, the extra training text
`berth.finetune.extra_text`, and the long-document evaluation `berth.finetune.robustness`; `ClassificationTask`
puts them together behind the `Task` protocol.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from berth.core.errors import BerthError
from berth.finetune.batching import encoder_batch
from berth.finetune.config import FinetuneConfig
from berth.finetune.data import (
    Split,
    check_labels,
    check_texts,
    content_digest,
    label_values,
    load_splits,
    require_columns,
    resolve_labels,
)
from berth.finetune.extra_text import UNIFORM, build_extra_text
from berth.finetune.metrics import load_metric
from berth.finetune.modeling import POOLER_FILE, WindowClassifier, build_pretrained
from berth.finetune.pooling import POOLERS, WINDOW_AGGREGATIONS, HierarchicalPooler, document_logits
from berth.finetune.robustness import evaluate_robustness
from berth.finetune.task import Loaded
from berth.finetune.windows import Encoded, WindowSettings, encode_texts
from berth.finetune.yardstick import tfidf_yardstick

logger = logging.getLogger(__name__)


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None = None,
    unit_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of units' logits [U, C] against their labels [U]; a UNIFORM unit (an outlier window)
    against the uniform distribution, i.e. its mean negative log-probability over the classes. `weight` [C] weighs
    classes (as in nll_loss), `unit_weights` [U] each unit (hidden-text windows below 1)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [U, C]
    task = nn.functional.nll_loss(log_probs, labels.clamp(min=0), weight=weight, reduction="none")  # [U]
    losses = torch.where(labels == UNIFORM, -log_probs.mean(dim=-1), task)  # [U]
    return (losses if unit_weights is None else losses * unit_weights).sum()


class ClassificationTask:
    """Data, model, loss and metrics of text (pair) classification; the fine-tuning loop drives it."""

    kind: str = "classification"
    metrics: tuple[str, ...] = ("accuracy", "macro_f1", "micro_f1", "loss")

    def __init__(self, cfg: FinetuneConfig, tokenizer: PreTrainedTokenizerBase):
        data = cfg.data
        self.cfg, self.tokenizer = cfg, tokenizer
        self.settings = WindowSettings.from_data(self.kind, data)
        # attention or hierarchical: a trained pooler over whole documents; "" otherwise
        self.pooling: str = data.aggregation if data.aggregation in POOLERS and data.long_text == "windows" else ""
        # evaluation pools the gathered window vectors outside forward (`combine_windows`)
        self.forward_methods: tuple[str, ...] = ("documents",) if self.pooling else ()
        splits = load_splits(data)
        columns = [data.text_column, data.label_column] + ([data.text_pair_column] if data.text_pair_column else [])
        for split in splits.values():
            require_columns(split, columns)
        self.labels = resolve_labels(data, splits["train"], data.label_column)
        if data.class_weights and len(data.class_weights) != len(self.labels):
            raise BerthError(
                f"data.class_weights has {len(data.class_weights)} values for {len(self.labels)} labels "
                f"({', '.join(self.labels)})"
            )
        self.texts: dict[str, list[str]] = {}  # per split, for the TF-IDF yardstick
        self.splits = {name: self._encode(split) for name, split in splits.items()}
        train = self.splits["train"]
        self.extra = build_extra_text(
            data, cfg.train.seed, tokenizer, self.settings, train, self.texts["train"], bool(self.pooling)
        )
        logger.info(
            "classification: %d labels (%s); train %d texts in %d windows, validation %d texts",
            len(self.labels),
            ", ".join(self.labels),
            len(train.doc_labels),
            len(train.window_ids),
            len(self.splits["validation"].doc_labels),
        )

    def _encode(self, split: Split) -> Encoded:
        data = self.cfg.data
        texts = check_texts(split, data.text_column)
        pairs = check_texts(split, data.text_pair_column) if data.text_pair_column else None
        self.texts[split.name] = texts if pairs is None else [f"{a}\n{b}" for a, b in zip(texts, pairs, strict=True)]
        values = label_values(split, data.label_column)
        check_labels(split, values, self.labels, data.label_column, training_labels=not data.label_names)
        index = {name: i for i, name in enumerate(self.labels)}
        return encode_texts(self.tokenizer, texts, self.settings, pairs, [index[v] for v in values])

    # -- model ---------------------------------------------------------------------------------------------

    def build_model(self, init: str, config: Any, from_scratch: bool) -> WindowClassifier:
        config.num_labels = len(self.labels)
        config.id2label = dict(enumerate(self.labels))
        config.label2id = {name: i for i, name in enumerate(self.labels)}
        model = build_pretrained(AutoModelForSequenceClassification, init, config, from_scratch)
        return WindowClassifier(model, self.pooling, self.cfg.data.pooler_layers)

    def fingerprint(self) -> str:
        splits = sorted({**self.splits, "extra": self.extra.encoded}.items())
        return content_digest([(name, e.window_ids, e.window_types, e.doc_labels) for name, e in splits])

    def export_settings(self, aggregation: str) -> WindowSettings:
        """What the export carries: these settings with the aggregation validation chose in place of auto."""
        return replace(self.settings, aggregation=aggregation)

    # -- training ------------------------------------------------------------------------------------------

    def train_units(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """Units of a training batch: single windows (each with its document's label), then the extra windows of
        outlier exposure and hidden-text training; or whole documents for the pooled aggregations (at most
        max_train_windows of their windows, drawn per epoch), the hidden documents after the training ones.
        Returns the window numbers of each unit and its length for grouping."""
        train = self.splits["train"]
        if not self.pooling:
            units = [[w] for w in range(len(train.window_ids))]
            units += self.extra.window_units(self.cfg.train.seed, epoch)
        else:
            rng = np.random.default_rng([self.cfg.train.seed, epoch, 3])
            cap = self.cfg.data.max_train_windows
            units = [
                sorted(rng.choice(ws, cap, replace=False).tolist()) if cap and len(ws) > cap else ws
                for ws in [*train.doc_windows, *self.extra.documents()]
            ]
        return units, [sum(len(self.window(w)[0]) for w in unit) for unit in units]

    def window(self, w: int, split: str = "train") -> tuple[list[int], list[int], int]:
        """Window w of the split: (ids, token types, label); numbers past the split's windows are the extra
        training text's."""
        own = self.splits[split]
        if w >= len(own.window_ids):
            return self.extra.window(w)
        return own.window_ids[w], own.window_types[w], own.doc_labels[own.window_doc[w]]

    def collate(self, units: list[list[int]], split: str = "train") -> dict[str, torch.Tensor]:
        windows = [self.window(w, split) for unit in units for w in unit]
        batch = encoder_batch(
            [ids for ids, _, _ in windows], [types for _, types, _ in windows], self.tokenizer.pad_token_id
        )
        batch["unit"] = torch.tensor([u for u, unit in enumerate(units) for _ in unit])  # [W]
        batch["labels"] = torch.tensor([self.window(unit[0], split)[2] for unit in units])  # [U]; UNIFORM: outlier
        weights = self.extra.unit_weights(units) if split == "train" else None
        if weights is not None:
            batch["unit_weights"] = weights  # [U]
        return batch

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's units (texts, or windows with their text's label): one target each."""
        return torch.tensor(len(batch["labels"]), device=batch["labels"].device)

    def loss(self, model: WindowClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over the batch's units (the loop normalises over all processes)."""
        # [U, C]: a unit is a window, or a document pooled inside the model's forward
        logits, _ = model(
            batch["input_ids"],
            batch["token_type_ids"],
            batch["attention_mask"],
            unit=batch["unit"] if self.pooling else None,
            num_units=len(batch["labels"]),
        )
        weight = (
            torch.tensor(self.cfg.data.class_weights, device=logits.device) if self.cfg.data.class_weights else None
        )
        return classification_loss(logits, batch["labels"], weight, batch.get("unit_weights"))

    # -- evaluation ----------------------------------------------------------------------------------------

    def predict_split(
        self, model: WindowClassifier, encoded: Encoded, acc: Any, batch_size: int
    ) -> dict[str, torch.Tensor]:
        """Document logits [D, C] by every aggregation this model supports."""
        hows = (*WINDOW_AGGREGATIONS, self.pooling) if self.pooling else WINDOW_AGGREGATIONS
        return document_logits(model, encoded, self.tokenizer.pad_token_id, acc, batch_size, hows)

    def evaluate(
        self, model: WindowClassifier, split: str, acc: Any, batch_size: int, aggregation: str | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Document-level metrics (all documents, and those longer than one window), for each aggregation;
        the headline figures use `aggregation`, or the best on this split when the config says auto."""
        encoded = self.splits[split]
        by_aggregation = self.predict_split(model, encoded, acc, batch_size)
        labels = torch.tensor(encoded.doc_labels)
        long_docs = self.long_documents(split)
        results = {how: self._scores(logits, labels, long_docs) for how, logits in by_aggregation.items()}
        chosen = aggregation or self.choose_aggregation(results)
        metrics: dict[str, Any] = {**results[chosen], "aggregation": chosen, "long_count": len(long_docs)}
        for how, scores in results.items():
            metrics[f"accuracy_{how}"] = scores["accuracy"]
            metrics[f"long_accuracy_{how}"] = scores["long_accuracy"]
        probs = torch.softmax(by_aggregation[chosen], dim=-1)
        score, predicted = probs.max(dim=-1)
        predictions = [
            {
                "index": d,
                "label": self.labels[int(predicted[d])],
                "score": round(float(score[d]), 6),
                "reference": self.labels[int(labels[d])] if labels[d] >= 0 else None,
                "windows": len(encoded.doc_windows[d]),
            }
            for d in range(len(labels))
        ]
        return metrics, predictions

    def test_extras(self, model: WindowClassifier, acc: Any, batch_size: int) -> dict[str, Any]:
        """Beside the test figures: the same weights with truncation instead of windows, and the TF-IDF yardstick."""
        t, data, extras = self.cfg.train, self.cfg.data, {}
        if t.compare_truncation and data.long_text == "windows" and not data.text_pair_column:
            extras["test_truncated"] = self.evaluate_truncated(model, "test", acc, batch_size)
        if data.robustness_docs and data.long_text == "windows" and not data.text_pair_column and "test" in self.texts:
            extras.update(evaluate_robustness(self, model, acc, batch_size))
        if t.yardstick and acc.is_main_process:
            labels = {name: encoded.doc_labels for name, encoded in self.splits.items()}
            long_docs = {name: self.long_documents(name) for name in self.splits}
            extras["yardstick"] = tfidf_yardstick(self.texts, labels, long_docs, t.seed)
        return extras

    def long_documents(self, split: str) -> list[int]:
        """The documents of the split longer than one window (content tokens beyond max_seq_len - 2)."""
        room = self.settings.max_seq_len - 2
        return [d for d, n in enumerate(self.splits[split].doc_tokens) if n > room]

    def evaluate_truncated(self, model: WindowClassifier, split: str, acc: Any, batch_size: int) -> dict[str, Any]:
        """The same model on the split with each truncation strategy instead of windows: accuracy overall and on
        the texts longer than one window, to compare windows against truncation without retraining."""
        encoded = self.splits[split]
        labels = torch.tensor(encoded.doc_labels)
        long_docs = self.long_documents(split)
        out = {}
        for strategy in ("head", "tail", "head_tail"):
            settings = replace(self.settings, long_text=strategy)
            truncated = encode_texts(self.tokenizer, self.texts[split], settings, labels=encoded.doc_labels)
            logits = document_logits(model, truncated, self.tokenizer.pad_token_id, acc, batch_size, ("mean",))["mean"]
            scores = self._scores(logits, labels, long_docs)
            out[strategy] = {k: scores[k] for k in ("accuracy", "macro_f1", "long_accuracy")}
        return out

    def choose_aggregation(self, results: dict[str, dict[str, float]]) -> str:
        """The one place `auto` is resolved (`choose_aggregation` below)."""
        if self.cfg.data.long_text != "windows":
            return "mean"  # one window per text: every aggregation is the same
        if self.cfg.data.aggregation != "auto":
            return self.cfg.data.aggregation
        return choose_aggregation(results, self.cfg.train.metric)

    def _scores(self, logits: torch.Tensor, labels: torch.Tensor, long_docs: list[int]) -> dict[str, float]:
        predicted = logits.argmax(dim=-1)
        loss = nn.functional.cross_entropy(logits, labels).item() if len(labels) else 0.0
        scores = {**self._classification_scores(predicted, labels), "loss": loss}
        if long_docs:
            subset = torch.tensor(long_docs)
            long = self._classification_scores(predicted[subset], labels[subset])
            scores.update({f"long_{k}": v for k, v in long.items()})
        else:
            scores.update({"long_accuracy": float("nan"), "long_macro_f1": float("nan")})
        return scores

    def _classification_scores(self, predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        accuracy = load_metric("accuracy").compute(predictions=predicted.tolist(), references=labels.tolist())
        f1 = load_metric("f1").compute(
            predictions=predicted.tolist(), references=labels.tolist(), num_labels=len(self.labels)
        )
        return {**accuracy, "macro_f1": f1["macro_f1"], "micro_f1": f1["micro_f1"]}


def choose_aggregation(results: dict[str, dict[str, float]], metric: str) -> str:
    """`auto`: the window aggregation with the best `metric` on the split (validation; lower is better for a loss),
    among every one computed from window logits alone; a tie goes to the one listed first in WINDOW_AGGREGATIONS
    (mean first)."""
    sign = -1.0 if metric.endswith("loss") else 1.0
    candidates = [how for how in WINDOW_AGGREGATIONS if how in results]
    return max(candidates, key=lambda how: (sign * results[how][metric], -candidates.index(how)))


# -- berth predict -------------------------------------------------------------------------------------------


def predict_model(model: PreTrainedModel, path: Path, settings: WindowSettings) -> torch.nn.Module:
    """An exported classifier ready to predict: wrapped with the pooler it was trained with, if any."""
    pooling = settings.aggregation if settings.aggregation in POOLERS else ""
    weights = load_file(str(path / POOLER_FILE)) if pooling else {}
    classifier = WindowClassifier(model, pooling, HierarchicalPooler.layers_in(weights) or 1)
    if classifier.pooler is not None:
        classifier.pooler.load_state_dict(weights)
    return classifier


def predict_labels(loaded: Loaded, texts: list[str], pairs: list[str] | None, batch_size: int) -> list[dict[str, Any]]:
    """One {"label", "score"} per text (or pair), cut and combined as in training."""
    tokenizer, how = loaded.tokenizer, loaded.settings.aggregation
    encoded = encode_texts(tokenizer, texts, loaded.settings, pairs)
    logits = document_logits(loaded.model, encoded, tokenizer.pad_token_id, loaded.acc, batch_size, (how,))[how]
    score, label = torch.softmax(logits, dim=-1).max(dim=-1)
    return [{"label": loaded.labels[int(i)], "score": round(float(s), 6)} for i, s in zip(label, score, strict=True)]
