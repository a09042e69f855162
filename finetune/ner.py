"""Token classification (BIO tags): labels on each word's first piece, long paragraphs in windows, each token
predicted from the window where it has the most context."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForTokenClassification, PreTrainedTokenizerBase

from berth.core.errors import BerthError
from berth.core.labels import IGNORE_INDEX
from berth.finetune.batching import encoder_batch, eval_order, evaluating, gather_in_order, pad_rows
from berth.finetune.bio import bio_spans
from berth.finetune.config import FinetuneConfig
from berth.finetune.data import (
    Split,
    check_labels,
    check_tokens,
    content_digest,
    label_values,
    load_splits,
    require_columns,
    resolve_labels,
)
from berth.finetune.metrics import load_metric
from berth.finetune.modeling import build_pretrained, encoder_inputs, input_names
from berth.finetune.task import Loaded
from berth.finetune.windows import WindowSettings, max_context_owner, window_spans

logger = logging.getLogger(__name__)


@dataclass
class Paragraph:
    """One input as pieces: piece_word[p] is the word piece p belongs to; first_piece[w] is word w's first
    piece (-1 when the tokenizer gave it none, e.g. a control character)."""

    ids: list[int]
    piece_word: list[int]
    first_piece: list[int]
    tags: list[int]  # per word; -1: unknown (prediction)
    spans: list[tuple[int, int]] = field(default_factory=list)  # windows over pieces
    windows: list[int] = field(default_factory=list)  # their indices in the split's window list


def paragraph_from_word_ids(ids: list[int], word_ids: list[int | None], num_words: int, tags: list[int]) -> Paragraph:
    first = [-1] * num_words
    piece_word = []
    for p, w in enumerate(word_ids):
        piece_word.append(-1 if w is None else w)
        if w is not None and first[w] < 0:
            first[w] = p
    return Paragraph(list(ids), piece_word, first, list(tags))


@dataclass
class NerEncoded:
    paragraphs: list[Paragraph] = field(default_factory=list)
    window_ids: list[list[int]] = field(default_factory=list)  # [CLS] pieces [SEP]
    window_labels: list[list[int]] = field(default_factory=list)  # tag of a word's first piece, else IGNORE_INDEX
    window_doc: list[int] = field(default_factory=list)


def add_windows(encoded: NerEncoded, paragraph: Paragraph, cls: int, sep: int, max_seq_len: int, stride: int) -> None:
    doc = len(encoded.paragraphs)
    labels = [IGNORE_INDEX] * len(paragraph.ids)
    for w, p in enumerate(paragraph.first_piece):
        if p >= 0 and paragraph.tags[w] >= 0:
            labels[p] = paragraph.tags[w]
    paragraph.spans = window_spans(len(paragraph.ids), max_seq_len - 2, stride)
    for start, end in paragraph.spans:
        paragraph.windows.append(len(encoded.window_ids))
        encoded.window_ids.append([cls, *paragraph.ids[start:end], sep])
        encoded.window_labels.append([IGNORE_INDEX, *labels[start:end], IGNORE_INDEX])
        encoded.window_doc.append(doc)
    encoded.paragraphs.append(paragraph)


def encode_words(
    tokenizer: PreTrainedTokenizerBase, words: list[list[str]], tags: list[list[int]], max_seq_len: int, stride: int
) -> NerEncoded:
    """Pre-split words (characters for Chinese) with word-level tag ids into windows."""
    out = NerEncoded()
    batch = tokenizer(words, is_split_into_words=True, add_special_tokens=False, verbose=False)
    for i, (row, row_tags) in enumerate(zip(words, tags, strict=True)):
        paragraph = paragraph_from_word_ids(batch["input_ids"][i], batch.word_ids(i), len(row), row_tags)
        add_windows(out, paragraph, tokenizer.cls_token_id, tokenizer.sep_token_id, max_seq_len, stride)
    return out


def token_predictions(paragraph: Paragraph, window_logits: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per word: the predicted tag id and its probability, each from the window where the word's first piece has
    the most context. window_logits[k] is [len(window k), C] for the paragraph's k-th window. Words without a
    piece get tag 0 (O) with probability 1."""
    owner = max_context_owner(paragraph.spans, len(paragraph.ids))
    tags = np.zeros(len(paragraph.first_piece), dtype=np.int64)
    probs = np.ones(len(paragraph.first_piece), dtype=np.float32)
    for w, p in enumerate(paragraph.first_piece):
        if p < 0:
            continue
        k = owner[p]
        row = window_logits[k][p - paragraph.spans[k][0] + 1]  # +1: [CLS]
        e = np.exp(row - row.max())
        tags[w], probs[w] = int(row.argmax()), float(e.max() / e.sum())
    return tags, probs


class NerTask:
    kind: str = "ner"
    metrics: tuple[str, ...] = ("f1", "precision", "recall", "loss")
    forward_methods: tuple[str, ...] = ()

    def __init__(self, cfg: FinetuneConfig, tokenizer: PreTrainedTokenizerBase):
        data = cfg.data
        self.cfg, self.tokenizer = cfg, tokenizer
        splits = load_splits(data)
        for split in splits.values():
            require_columns(split, [data.tokens_column, data.tags_column])
        self.labels = resolve_labels(data, splits["train"], data.tags_column)
        bad = [name for name in self.labels if name != "O" and name[:2] not in ("B-", "I-")]
        if bad:
            raise BerthError(f"task=ner needs BIO tags (O, B-TYPE, I-TYPE); got {', '.join(bad[:5])}")
        self.splits = {name: self._encode(split) for name, split in splits.items()}
        train = self.splits["train"]
        logger.info(
            "ner: %d tags (%s); train %d paragraphs in %d windows",
            len(self.labels),
            ", ".join(self.labels),
            len(train.paragraphs),
            len(train.window_ids),
        )

    def _encode(self, split: Split) -> NerEncoded:
        data = self.cfg.data
        values = label_values(split, data.tags_column)
        check_labels(split, values, self.labels, data.tags_column, training_labels=not data.label_names)
        words = check_tokens(split, data.tokens_column, values)
        index = {name: i for i, name in enumerate(self.labels)}
        tags = [[index[t] for t in row] for row in values]
        return encode_words(self.tokenizer, words, tags, data.max_seq_len, data.stride)

    def build_model(self, init: str, config: Any, from_scratch: bool) -> nn.Module:
        config.num_labels = len(self.labels)
        config.id2label = dict(enumerate(self.labels))
        config.label2id = {name: i for i, name in enumerate(self.labels)}
        model = build_pretrained(AutoModelForTokenClassification, init, config, from_scratch)
        self.input_names = input_names(model)  # read before an engine wraps the model
        return model

    def fingerprint(self) -> str:
        return content_digest([(name, e.window_ids, e.window_labels) for name, e in sorted(self.splits.items())])

    def export_settings(self, aggregation: str) -> WindowSettings:
        return WindowSettings(self.kind, self.cfg.data.max_seq_len, self.cfg.data.stride)

    # -- training ------------------------------------------------------------------------------------------

    def train_units(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        train = self.splits["train"]
        return [[w] for w in range(len(train.window_ids))], [len(ids) for ids in train.window_ids]

    def collate(self, units: list[list[int]], split: str = "train") -> dict[str, torch.Tensor]:
        encoded = self.splits[split]
        windows = [w for unit in units for w in unit]
        batch = encoder_batch(
            [encoded.window_ids[w] for w in windows],
            [[0] * len(encoded.window_ids[w]) for w in windows],
            self.tokenizer.pad_token_id,
        )
        batch["labels"] = pad_rows([encoded.window_labels[w] for w in windows], IGNORE_INDEX)
        return batch

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's tagged tokens (the first piece of each word in its window's max-context span)."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**encoder_inputs(self.input_names, batch)).logits  # [B, L, C]
        weight = (
            torch.tensor(self.cfg.data.class_weights, device=logits.device) if self.cfg.data.class_weights else None
        )
        return nn.functional.cross_entropy(
            logits.flatten(0, 1).float(),
            batch["labels"].flatten(),
            weight=weight,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    # -- evaluation ----------------------------------------------------------------------------------------

    def test_extras(self, model: nn.Module, acc: Any, batch_size: int) -> dict[str, Any]:
        return {}

    def evaluate(
        self, model: nn.Module, split: str, acc: Any, batch_size: int, aggregation: str | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        encoded = self.splits[split]
        logits = window_logits(model, self.input_names, encoded, self.tokenizer.pad_token_id, acc, batch_size)
        predicted, references, rows = [], [], []
        loss_sum, loss_count = 0.0, 0
        for d, paragraph in enumerate(encoded.paragraphs):
            windows = [logits[w] for w in paragraph.windows]
            tags, _ = token_predictions(paragraph, windows)
            pred = [self.labels[t] for t in tags]
            ref = [self.labels[t] for t in paragraph.tags]
            predicted.append(pred)
            references.append(ref)
            for w in paragraph.windows:
                row_logits = torch.from_numpy(logits[w])
                labels = torch.tensor(encoded.window_labels[w])
                loss_sum += nn.functional.cross_entropy(
                    row_logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"
                ).item()
                loss_count += int((labels != IGNORE_INDEX).sum())
            rows.append(
                {
                    "index": d,
                    "entities": [{"type": k, "start": s, "end": e} for k, s, e in bio_spans(pred)],
                    "reference": [{"type": k, "start": s, "end": e} for k, s, e in bio_spans(ref)],
                }
            )
        scores = load_metric("entity_f1").compute(predictions=predicted, references=references)
        scores["loss"] = loss_sum / max(loss_count, 1)
        scores["long_count"] = sum(len(p.spans) > 1 for p in encoded.paragraphs)
        return scores, rows


@torch.no_grad()
def window_logits(
    model: nn.Module, names: tuple[str, ...], encoded: NerEncoded, pad_id: int, acc: Any, batch_size: int
) -> list[np.ndarray]:
    """[len(window), C] logits of every window (each process runs its share; dropout off); `names`: the inputs
    the model takes (`input_names`)."""
    lengths = [len(ids) for ids in encoded.window_ids]
    found: list[tuple[int, np.ndarray]] = []
    with evaluating(model):
        for part in eval_order(lengths, batch_size, acc.process_index, acc.num_processes):
            rows = part.rows
            batch = encoder_batch([encoded.window_ids[w] for w in rows], [[0] * lengths[w] for w in rows], pad_id)
            inputs = encoder_inputs(names, {k: v.to(acc.device) for k, v in batch.items()})
            logits = model(**inputs).logits.float().cpu().numpy()
            found.extend((w, logits[i, : lengths[w]]) for i, w in enumerate(part.mine))
    return gather_in_order(acc, found, len(lengths))


# -- berth predict -------------------------------------------------------------------------------------------


def predict_entities(
    loaded: Loaded, texts: list[str], pairs: list[str] | None, batch_size: int
) -> list[dict[str, Any]]:
    """One {"entities": [{type, start, end, text, score}]} per text, character offsets into it; each word tagged
    from the window where it has the most context, as in training. NER takes single texts: `pairs` is None."""
    model, tokenizer, settings, labels = loaded.model, loaded.tokenizer, loaded.settings, loaded.labels
    batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    encoded = NerEncoded()
    for i in range(len(texts)):
        word_ids = batch.word_ids(i)
        num_words = max((w for w in word_ids if w is not None), default=-1) + 1
        paragraph = paragraph_from_word_ids(batch["input_ids"][i], word_ids, num_words, [-1] * num_words)
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        add_windows(encoded, paragraph, cls, sep, settings.max_seq_len, settings.stride)
    logits = window_logits(model, input_names(model), encoded, tokenizer.pad_token_id, loaded.acc, batch_size)
    out = []
    for i, paragraph in enumerate(encoded.paragraphs):
        tags, probs = token_predictions(paragraph, [logits[w] for w in paragraph.windows])
        offsets = batch["offset_mapping"][i]
        starts, ends = word_offsets(paragraph.piece_word, offsets, len(paragraph.first_piece))
        entities = []
        for kind, first, last in bio_spans([labels[t] for t in tags]):
            start, end = starts[first], ends[last - 1]
            entities.append(
                {
                    "type": kind,
                    "start": start,
                    "end": end,
                    "text": texts[i][start:end],
                    "score": round(float(np.mean(probs[first:last])), 6),
                }
            )
        out.append({"entities": entities})
    return out


def word_offsets(piece_word: list[int], offsets: list[tuple[int, int]], num_words: int) -> tuple[list[int], list[int]]:
    """Character start and end of each word, from its pieces' offsets."""
    starts, ends = [0] * num_words, [0] * num_words
    seen = [False] * num_words
    for p, w in enumerate(piece_word):
        if w < 0:
            continue
        if not seen[w]:
            starts[w], seen[w] = offsets[p][0], True
        ends[w] = offsets[p][1]
    return starts, ends
