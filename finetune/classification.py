"""Sequence classification on the [CLS] vector, with long texts in windows aggregated per document."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from berth.core.errors import BerthError
from berth.core.models import HFModel
from berth.finetune.batching import encoder_batch, eval_order, evaluating, gather_in_order
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
from berth.finetune.metrics import load_metric
from berth.finetune.modeling import build_pretrained, encoder_inputs
from berth.finetune.robustness import (
    POSITIONS,
    ROBUSTNESS_SEED,
    RobustnessSet,
    TextWindows,
    build_documents,
    distractor_paragraphs,
    outlier_paragraphs,
    text_windows,
)
from berth.finetune.windows import WindowSettings, truncate, window_spans
from berth.finetune.yardstick import tfidf_yardstick

logger = logging.getLogger(__name__)

UNIFORM = -2  # the label of an outlier window: trained towards the uniform distribution (-1 is a missing label)
NEUTRAL_PER_DOCUMENT = 1  # hidden-text training with window aggregations: windows without the text kept per document


@dataclass
class Encoded:
    """A split as windows: window w belongs to document window_doc[w]; every document has at least one."""

    window_ids: list[list[int]] = field(default_factory=list)  # [CLS] tokens [SEP] (pairs: ... [SEP] B [SEP])
    window_types: list[list[int]] = field(default_factory=list)
    window_doc: list[int] = field(default_factory=list)
    doc_windows: list[list[int]] = field(default_factory=list)
    doc_tokens: list[int] = field(default_factory=list)  # content tokens before cutting
    doc_labels: list[int] = field(default_factory=list)  # -1: unknown (prediction)

    def add_document(self, label: int, tokens: int) -> int:
        """A new document of `tokens` content tokens before cutting, with no window yet; returns its index."""
        self.doc_windows.append([])
        self.doc_tokens.append(tokens)
        self.doc_labels.append(label)
        return len(self.doc_labels) - 1

    def add_cuts(self, label: int, tokens: int, cuts: list[list[int]], cls: int, sep: int) -> None:
        """A single-text document of `tokens` content tokens, cut into `cuts`: each becomes [CLS] cut [SEP]."""
        doc = self.add_document(label, tokens)
        for cut in cuts:
            self.add(doc, [cls, *cut, sep], [0] * (len(cut) + 2))

    def add(self, doc: int, ids: list[int], types: list[int]) -> None:
        self.doc_windows[doc].append(len(self.window_ids))
        self.window_ids.append(ids)
        self.window_types.append(types)
        self.window_doc.append(doc)

    def extend(self, other: Encoded) -> Encoded:
        """This split with `other`'s documents after its own (renumbered); returns self."""
        windows, docs = len(self.window_ids), len(self.doc_labels)
        self.window_ids += other.window_ids
        self.window_types += other.window_types
        self.window_doc += [docs + d for d in other.window_doc]
        self.doc_windows += [[windows + w for w in ws] for ws in other.doc_windows]
        self.doc_tokens += other.doc_tokens
        self.doc_labels += other.doc_labels
        return self


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    settings: WindowSettings,
    pairs: list[str] | None = None,
    labels: list[int] | None = None,
) -> Encoded:
    """Tokenize and cut: windows of max_seq_len - 2 tokens `stride` apart, or one truncated window per text.

    Text pairs that do not fit are cut by `pair_cuts`: windows over the longer text with the shorter one in
    every window, or (truncation strategies) one window truncated longest-first.
    """
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    room = settings.max_seq_len - 2
    encoded = Encoded()
    labels = list(labels) if labels is not None else [-1] * len(texts)
    # verbose=False: long texts are expected here (they are cut below), so no "longer than the maximum" warning.
    pieces = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    pair_pieces = tokenizer(pairs, add_special_tokens=False, verbose=False)["input_ids"] if pairs is not None else None
    for doc, ids in enumerate(pieces):
        if pair_pieces is not None:
            encoded.add_document(labels[doc], len(ids) + len(pair_pieces[doc]))
            for a, b in pair_cuts(ids, pair_pieces[doc], settings):
                encoded.add(doc, [cls, *a, sep, *b, sep], [0] * (len(a) + 2) + [1] * (len(b) + 1))
            continue
        if settings.long_text == "windows":
            cuts = [ids[start:end] for start, end in window_spans(len(ids), room, settings.stride)]
        else:
            cuts = [truncate(ids, room, settings.long_text, settings.head_fraction)]
        encoded.add_cuts(labels[doc], len(ids), cuts, cls, sep)
    return encoded


def encode_hidden(
    tokenizer: PreTrainedTokenizerBase, docs: RobustnessSet, settings: WindowSettings
) -> tuple[Encoded, list[TextWindows]]:
    """A RobustnessSet's documents cut as encode_texts cuts them, and where the hidden text lies in each window,
    from one tokenization."""
    found = text_windows(tokenizer, docs, settings)
    encoded = Encoded()
    for label, doc in zip(docs.labels, found, strict=True):
        cuts = [doc.ids[start:end] for start, end in doc.spans]
        encoded.add_cuts(label, len(doc.ids), cuts, tokenizer.cls_token_id, tokenizer.sep_token_id)
    return encoded, found


def pair_cuts(a: list[int], b: list[int], settings: WindowSettings) -> list[tuple[list[int], list[int]]]:
    """The (first, second) token lists of each window of a text pair ([CLS] a [SEP] b [SEP]).

    With windows, the shorter text (the first on a tie) stays whole in every window -- the question beside each
    window of a passage, as in Google's run_squad.py, whichever side the long text is on -- cut to its head
    when it would take more than half the room; the longer text slides through the rest, `stride` tokens apart
    (less when the room is smaller than the stride). Truncation strategies keep one window, truncated
    longest-first, as transformers' tokenizers do.
    """
    room = settings.max_seq_len - 3
    if len(a) + len(b) <= room:
        return [(list(a), list(b))]
    if settings.long_text != "windows":
        a, b = list(a), list(b)
        while len(a) + len(b) > room:
            (a if len(a) >= len(b) else b).pop()
        return [(a, b)]
    first_is_long = len(a) > len(b)
    short, long = (b, a) if first_is_long else (a, b)
    short = list(short[: room // 2])
    size = room - len(short)
    cuts = [list(long[start:end]) for start, end in window_spans(len(long), size, min(settings.stride, size))]
    return [(cut, short) if first_is_long else (short, cut) for cut in cuts]


class WindowPooler(nn.Module):
    """Attention pooling over the windows of a document: a learned score per window's [CLS] vector, a softmax
    within each document, and the weighted sum of the vectors."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)

    def forward(self, vectors: torch.Tensor, doc: torch.Tensor, num_docs: int) -> torch.Tensor:
        # vectors [W, H], doc [W] -> [D, H]
        scores = self.score(vectors).squeeze(-1).float()  # [W]
        top = torch.full((num_docs,), float("-inf"), device=scores.device).scatter_reduce(0, doc, scores, "amax")
        weights = torch.exp(scores - top[doc])  # [W]
        total = torch.zeros(num_docs, device=scores.device).index_add(0, doc, weights)
        weights = (weights / total[doc]).to(vectors.dtype)
        pooled = torch.zeros(num_docs, vectors.shape[-1], dtype=vectors.dtype, device=vectors.device)
        return pooled.index_add(0, doc, weights[:, None] * vectors)


class HierarchicalPooler(nn.Module):
    """The third classic way to read a long text, after truncation and windows: a small transformer encoder over a
    document's window vectors, with a learned [CLS] of its own in front and learned window positions, whose output
    at that [CLS] is the document's vector. Post-LN blocks with GELU, like BERT's; padding windows are masked."""

    def __init__(self, hidden_size: int, layers: int = 1, max_windows: int = 64, dropout: float = 0.1):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(hidden_size))
        self.positions = nn.Embedding(max_windows + 1, hidden_size)  # 0: the [CLS]; later windows share the last
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        block = nn.TransformerEncoderLayer(
            hidden_size,
            nhead=max(1, hidden_size // 64),
            dim_feedforward=4 * hidden_size,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)

    @staticmethod
    def layers_in(weights: dict[str, torch.Tensor]) -> int:
        """How many encoder layers a saved pooler has (its file names them)."""
        return len({key.split(".")[2] for key in weights if key.startswith("encoder.layers.")})

    def forward(self, vectors: torch.Tensor, doc: torch.Tensor, num_docs: int) -> torch.Tensor:
        # vectors [W, H], doc [W] (windows of a document in order) -> [D, H]
        counts = torch.zeros(num_docs, dtype=torch.long, device=doc.device).index_add(0, doc, torch.ones_like(doc))
        longest = int(counts.max()) if num_docs else 0
        # [W] each window's 1-based place in its document, in the order the windows come
        order = torch.argsort(doc, stable=True)
        starts = torch.cumsum(counts, 0) - counts  # [D]
        slot = torch.empty_like(doc)
        slot[order] = torch.arange(len(doc), device=doc.device) - starts[doc[order]] + 1
        rows = torch.zeros(num_docs, longest + 1, vectors.shape[-1], dtype=vectors.dtype, device=vectors.device)
        rows[:, 0] = self.cls.to(vectors.dtype)
        rows[doc, slot] = vectors
        places = torch.arange(longest + 1, device=doc.device).clamp(max=self.positions.num_embeddings - 1)
        rows = rows + self.positions(places).to(vectors.dtype)[None]  # [D, 1 + Wmax, H]
        padding = torch.arange(longest + 1, device=doc.device)[None] > counts[:, None]  # [D, 1 + Wmax]
        return self.encoder(rows, src_key_padding_mask=padding)[:, 0]  # [D, H]


POOLERS = {"attention": WindowPooler, "hierarchical": HierarchicalPooler}  # aggregations with a trained layer

# Aggregations computed from the window logits alone (no trained layer), in the order evaluations report them.
WINDOW_AGGREGATIONS = ("mean", "max", "prob_mean", "confidence", "margin")


def aggregate(window_logits: torch.Tensor, doc: torch.Tensor, num_docs: int, how: str) -> torch.Tensor:
    """Per-document scores [D, C] from window logits [W, C] (window w belongs to document doc[w]); their argmax is
    the prediction and their softmax the document's probabilities.

    mean        the mean of the logits: every window votes with its raw confidence
    max         the elementwise max of the logits: any window's strongest evidence for each class
    prob_mean   log of the mean of the window probabilities
    confidence  log of the mean of the window probabilities, each window weighted by how decided it is (its top
                probability above chance, 1/C): windows without the task's signal, if scored flat, barely count
    margin      the log-probabilities of the most decided window (the largest gap between its two most likely
                classes): one clear verdict outweighs any number of lukewarm windows
    """
    classes = window_logits.shape[-1]
    rows = doc[:, None].expand(-1, classes)
    if how == "mean":
        total = torch.zeros(num_docs, classes, dtype=window_logits.dtype).index_add(0, doc, window_logits)
        count = torch.zeros(num_docs, dtype=window_logits.dtype).index_add(
            0, doc, torch.ones_like(doc, dtype=window_logits.dtype)
        )
        return total / count[:, None]
    if how == "max":
        start = torch.full((num_docs, classes), float("-inf"), dtype=window_logits.dtype)
        return start.scatter_reduce(0, rows, window_logits, "amax")
    log_probs = torch.log_softmax(window_logits.double(), dim=-1)  # [W, C]
    probs = log_probs.exp()
    if how in ("prob_mean", "confidence"):
        if how == "prob_mean":
            weights = torch.ones(len(doc), dtype=probs.dtype)
        else:
            weights = probs.max(dim=-1).values - 1.0 / classes  # [W], 0 for a flat window
            # a document whose windows are all flat: every window counts the same
            decided = torch.zeros(num_docs, dtype=probs.dtype).index_add(0, doc, weights)
            weights = torch.where(decided[doc] > 0, weights, torch.ones_like(weights))
        total = torch.zeros(num_docs, classes, dtype=probs.dtype).index_add(0, doc, probs * weights[:, None])
        return (total / total.sum(-1, keepdim=True)).log().to(window_logits.dtype)
    if how == "margin":
        top2 = log_probs.topk(min(2, classes), dim=-1).values  # [W, 2]
        margin = top2[:, 0] - top2[:, -1]  # [W]
        best = torch.full((num_docs,), float("-inf"), dtype=margin.dtype).scatter_reduce(0, doc, margin, "amax")
        # the first window of each document that reaches its best margin
        index = torch.arange(len(doc))
        candidates = torch.where(margin == best[doc], index, torch.full_like(index, len(doc)))
        chosen = torch.full((num_docs,), len(doc), dtype=index.dtype).scatter_reduce(0, doc, candidates, "amin")
        # no window reaches it when the margins are NaN (a diverged model): its first window, NaN as the others
        first = torch.full((num_docs,), len(doc), dtype=index.dtype).scatter_reduce(0, doc, index, "amin")
        return log_probs[torch.where(chosen < len(doc), chosen, first)].to(window_logits.dtype)
    raise ValueError(f"unknown aggregation {how!r}")


class WindowClassifier(nn.Module):
    """A transformers sequence classifier, plus the pooler (attention or hierarchical) when documents are pooled.

    For BERT (a pooler, `dropout` and `classifier`) and ModernBERT (`head`, `drop` and `classifier`) the
    window vectors the classifier reads are returned beside the logits, so attention pooling can feed a
    document's pooled vector to the same classifier. Other models give logits only.
    """

    model: HFModel
    forward_methods = ("documents",)  # used outside forward: a sharding engine must gather weights for it too

    def __init__(self, model: HFModel, pooling: str = "", pooler_layers: int = 1):
        super().__init__()
        self.model = model
        self.kind = vector_kind(model)
        self.pooling = pooling  # "", attention or hierarchical
        if pooling and self.kind is None:
            raise BerthError(
                f"data.aggregation={pooling} needs a BERT (with a pooler) or ModernBERT classifier; "
                f"{type(model).__name__} gives logits only"
            )
        self.pooler: nn.Module | None = None
        if pooling == "attention":
            self.pooler = WindowPooler(model.config.hidden_size)
        elif pooling == "hierarchical":
            self.pooler = HierarchicalPooler(model.config.hidden_size, pooler_layers)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind is None:
            batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
            return self.model(**encoder_inputs(self.model, batch)).logits, None
        if self.kind == "bert":
            out = self.model.base_model(
                input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
            )
            vectors = out.pooler_output  # [W, H]: the [CLS] vector through BERT's pooler
        else:  # ModernBERT: its classifier's own pooling ([CLS] or mean) and head
            hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask)[0]  # [W, L, H]
            if self.model.config.classifier_pooling == "mean":
                weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1)
            else:
                pooled = hidden[:, 0]
            vectors = self.model.head(pooled)  # [W, H]
        return self.classify(vectors), vectors

    def classify(self, vectors: torch.Tensor) -> torch.Tensor:
        drop = self.model.dropout if self.kind == "bert" else self.model.drop
        return self.model.classifier(drop(vectors))

    def documents(self, vectors: torch.Tensor, doc: torch.Tensor, num_docs: int) -> torch.Tensor:
        """Document logits [D, C] from window vectors [W, H] (windows of a document in order) by the pooler."""
        assert self.pooler is not None, "built without a pooler"
        return self.classify(self.pooler(vectors, doc, num_docs))


def vector_kind(model: HFModel) -> str | None:
    """ "bert" or "modernbert" when the classifier's window vectors can be read out, else None."""
    if all(hasattr(model, n) for n in ("classifier", "dropout")) and getattr(model.base_model, "pooler", None):
        return "bert"
    if model.config.model_type == "modernbert" and all(hasattr(model, n) for n in ("head", "drop", "classifier")):
        return "modernbert"
    return None


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
        self.settings = WindowSettings.from_data("classification", data)
        # attention or hierarchical: a trained pooler over whole documents; "" otherwise
        self.pooling = data.aggregation if data.aggregation in POOLERS and data.long_text == "windows" else ""
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
        if (data.outlier_exposure or data.hidden_training) and (data.long_text != "windows" or data.text_pair_column):
            key = "data.outlier_exposure" if data.outlier_exposure else "data.hidden_training"
            raise BerthError(
                f"{key} trains on single texts among unrelated text; it needs data.long_text=windows (not "
                f"{data.long_text}) and no data.text_pair_column"
            )
        if data.outlier_exposure and self.pooling:
            raise BerthError(
                "data.outlier_exposure trains single windows towards a flat distribution; it needs a window "
                f"aggregation, not {data.aggregation} (use data.hidden_training for the pooled ones)"
            )
        # the extra training text, numbered after the training windows: outlier windows (the first
        # self.outlier_windows, drawn anew each epoch), then the windows or documents of hidden-text training
        outliers = self._outlier_windows()
        self.outlier_windows = len(outliers.window_ids)
        self.extra = outliers.extend(self._hidden_documents() if self.pooling else self._hidden_windows())
        train = self.splits["train"]
        logger.info(
            "classification: %d labels (%s); train %d texts in %d windows, validation %d texts",
            len(self.labels),
            ", ".join(self.labels),
            len(train.doc_labels),
            len(train.window_ids),
            len(self.splits["validation"].doc_labels),
        )

    @functools.cached_property
    def _unrelated(self) -> tuple[list[str], str]:
        """The unrelated text of outlier exposure and hidden-text training, read once for both."""
        return outlier_paragraphs(self.cfg.data.outlier_text, self.tokenizer)

    def _unrelated_paragraphs(self, key: str) -> tuple[list[str], str]:
        """The unrelated paragraphs and their source; `key` names the setting that needs them in the error."""
        paragraphs, source = self._unrelated
        if not paragraphs:
            raise BerthError(
                f"{key}: no unrelated text (data.outlier_text=auto takes People's Daily only for a tokenizer that "
                "covers Chinese; name a file with one paragraph a line)"
            )
        return paragraphs, source

    def _outlier_windows(self) -> Encoded:
        """Windows of unrelated text for outlier exposure (Hendrycks et al. 2019): trained towards a flat
        distribution, so that text without the task's signal stops voting. Empty unless data.outlier_exposure."""
        if not self.cfg.data.outlier_exposure:
            return Encoded()
        paragraphs, source = self._unrelated_paragraphs("data.outlier_exposure")
        encoded = encode_texts(self.tokenizer, paragraphs, self.settings, labels=[UNIFORM] * len(paragraphs))
        logger.info("outlier exposure: %d windows of %s", len(encoded.window_ids), source)
        return encoded

    def _hidden_set(self) -> RobustnessSet:
        """data.hidden_training x the training texts, each hidden at one drawn position among unrelated paragraphs
        (3-8 windows; never the test share of People's Daily the robustness evaluation hides texts in)."""
        paragraphs, source = self._unrelated_paragraphs("data.hidden_training")
        labels = self.splits["train"].doc_labels
        count = round(self.cfg.data.hidden_training * len(labels))
        seed = self.cfg.train.seed
        docs = build_documents(
            self.texts["train"], labels, paragraphs, self.tokenizer, self.settings, count, seed, every_position=False
        )
        logger.info("hidden-text training: %d training texts among %s paragraphs", len(docs.texts), source)
        return docs

    def _hidden_documents(self) -> Encoded:
        """For the pooled aggregations (multiple-instance learning): the hidden documents as extra training
        documents with their text's label, so the pooler learns to find the verdict among windows that have none.
        Empty unless data.hidden_training."""
        if not self.cfg.data.hidden_training:
            return Encoded()
        docs = self._hidden_set()
        return encode_texts(self.tokenizer, docs.texts, self.settings, labels=docs.labels)

    def _hidden_windows(self) -> Encoded:
        """For the window aggregations: the hidden documents cut into windows, each labelled by what it holds --
        the text's label when it holds at least half of the text, UNIFORM when it holds none of it (at most
        NEUTRAL_PER_DOCUMENT of those per document, drawn), left out in between. A window then learns to speak
        for the verdict it contains, whatever surrounds it, and to stay flat when it contains none, so the one
        window with the verdict decides the document. Empty unless data.hidden_training."""
        if not self.cfg.data.hidden_training:
            return Encoded()
        docs = self._hidden_set()
        tokenizer = self.tokenizer
        rng = np.random.default_rng([self.cfg.train.seed, 6])
        out = Encoded()
        for d, doc in enumerate(text_windows(tokenizer, docs, self.settings)):
            verdict = [span for span, held in zip(doc.spans, doc.held, strict=True) if held and 2 * held >= doc.own]
            neutral = [span for span, held in zip(doc.spans, doc.held, strict=True) if not held]
            if len(neutral) > NEUTRAL_PER_DOCUMENT:
                picked = rng.choice(len(neutral), NEUTRAL_PER_DOCUMENT, replace=False)
                neutral = [neutral[i] for i in sorted(picked.tolist())]
            for (start, end), label in [*((v, docs.labels[d]) for v in verdict), *((n, UNIFORM) for n in neutral)]:
                out.add_cuts(label, end - start, [doc.ids[start:end]], tokenizer.cls_token_id, tokenizer.sep_token_id)
        logger.info(
            "hidden-text training: %d windows holding the text, %d without it (trained flat)",
            sum(label != UNIFORM for label in out.doc_labels),
            sum(label == UNIFORM for label in out.doc_labels),
        )
        return out

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
        splits = sorted({**self.splits, "extra": self.extra}.items())
        return content_digest([(name, e.window_ids, e.window_types, e.doc_labels) for name, e in splits])

    def export_settings(self, aggregation: str) -> WindowSettings:
        """What the export carries: these settings with the aggregation validation chose in place of auto."""
        return replace(self.settings, aggregation=aggregation)

    # -- training ------------------------------------------------------------------------------------------

    def train_units(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """Units of a training batch: single windows (each with its document's label; with outlier exposure, this
        epoch's draw of unrelated windows after them; with hidden-text training, then every labelled window of the
        hidden documents), or whole documents for the pooled aggregations (at most max_train_windows of their
        windows, drawn per epoch; with hidden-text training, the hidden documents after them). Returns the window
        indices of each unit and its length for grouping."""
        train = self.splits["train"]
        if not self.pooling:
            base = len(train.window_ids)
            units = [[w] for w in range(base)]
            if self.outlier_windows:
                # this epoch's unrelated windows, numbered after the training windows
                count = round(self.cfg.data.outlier_exposure * len(units))
                pool = self.outlier_windows
                drawn = np.random.default_rng([self.cfg.train.seed, epoch, 4]).choice(pool, count, replace=count > pool)
                units += [[base + int(w)] for w in drawn]
            # the windows of hidden-text training, every epoch
            units += [[w] for w in range(self.first_hidden_window, base + len(self.extra.window_ids))]
        else:
            rng = np.random.default_rng([self.cfg.train.seed, epoch, 3])
            cap = self.cfg.data.max_train_windows
            # the training documents, then those hidden among unrelated text (numbered after the training windows)
            documents = [
                *train.doc_windows,
                *([len(train.window_ids) + w for w in ws] for ws in self.extra.doc_windows),
            ]
            units = [
                sorted(rng.choice(ws, cap, replace=False).tolist()) if cap and len(ws) > cap else ws for ws in documents
            ]
        return units, [sum(len(self.window(w)[0]) for w in unit) for unit in units]

    @property
    def first_hidden_window(self) -> int:
        """The number of the first hidden-text training window: they come after the training windows and the
        outlier windows."""
        return len(self.splits["train"].window_ids) + self.outlier_windows

    def window(self, w: int, split: str = "train") -> tuple[list[int], list[int], int]:
        """Window w of the split: (ids, token types, label); numbers past the split's windows are the extra training
        text's (outlier windows, labelled UNIFORM, or hidden documents)."""
        own = self.splits[split]
        encoded, index = (own, w) if w < len(own.window_ids) else (self.extra, w - len(own.window_ids))
        return encoded.window_ids[index], encoded.window_types[index], encoded.doc_labels[encoded.window_doc[index]]

    def collate(self, units: list[list[int]], split: str = "train") -> dict[str, torch.Tensor]:
        windows = [self.window(w, split) for unit in units for w in unit]
        batch = encoder_batch(
            [ids for ids, _, _ in windows], [types for _, types, _ in windows], self.tokenizer.pad_token_id
        )
        batch["unit"] = torch.tensor([u for u, unit in enumerate(units) for _ in unit])  # [W]
        batch["labels"] = torch.tensor([self.window(unit[0], split)[2] for unit in units])  # [U]; UNIFORM: outlier
        if split == "train" and self.cfg.data.hidden_weight != 1.0:
            first = self.first_hidden_window
            batch["unit_weights"] = torch.tensor(
                [self.cfg.data.hidden_weight if unit[0] >= first else 1.0 for unit in units]
            )  # [U]
        return batch

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's units (texts, or windows with their text's label): one target each."""
        return torch.tensor(len(batch["labels"]), device=batch["labels"].device)

    def loss(self, model: WindowClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over the batch's units (the loop normalises over all processes)."""
        logits, vectors = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        if self.pooling:
            inner = cast(WindowClassifier, model.module if hasattr(model, "module") else model)  # DDP wraps it
            logits = inner.documents(vectors, batch["unit"], len(batch["labels"]))
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
        the headline figures use `aggregation`, or the best of mean and max when the config says auto."""
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
            robustness = self.evaluate_robustness(model, acc, batch_size)
            if robustness:
                extras["robustness"] = robustness
        if t.yardstick and acc.is_main_process:
            labels = {name: encoded.doc_labels for name, encoded in self.splits.items()}
            long_docs = {name: self.long_documents(name) for name in self.splits}
            extras["yardstick"] = tfidf_yardstick(self.texts, labels, long_docs, t.seed)
        return extras

    def robustness_set(self) -> tuple[RobustnessSet, str]:
        """The test texts hidden among distractor paragraphs, and the paragraphs' source; empty without them.
        Drawn from ROBUSTNESS_SEED, not train.seed: runs of different seeds are scored on the same documents."""
        paragraphs, source = distractor_paragraphs(self.cfg.data.distractors, self.tokenizer)
        if not paragraphs:
            return RobustnessSet(), ""
        test = self.splits["test"]
        docs = build_documents(
            self.texts["test"],
            test.doc_labels,
            paragraphs,
            self.tokenizer,
            self.settings,
            self.cfg.data.robustness_docs,
            ROBUSTNESS_SEED,
        )
        return docs, source

    def evaluate_robustness(self, model: WindowClassifier, acc: Any, batch_size: int) -> dict[str, Any]:
        """Accuracy by aggregation on test texts hidden at the start, middle and end of unrelated text 3-8 windows
        long, beside the same texts alone (`berth.finetune.robustness`); empty without distractor paragraphs."""
        data = self.cfg.data
        docs, source = self.robustness_set()
        if not docs.alone:
            return {}
        pad = self.tokenizer.pad_token_id
        hows = (*WINDOW_AGGREGATIONS, self.pooling) if self.pooling else WINDOW_AGGREGATIONS
        encoded, found = encode_hidden(self.tokenizer, docs, self.settings)
        with evaluating(model):
            logits, vectors = window_outputs(model, encoded, pad, acc, batch_size, vectors=bool(self.pooling))
            hidden = combine_windows(model, acc, logits, vectors, encoded.window_doc, len(docs.texts), hows)
            # The same documents from only the windows that hold some of the text (the distractor windows left
            # out): what stays below `alone` there is lost inside the text's own windows, which no way of combining
            # windows can win back; the rest is lost to distractor windows outvoting them.
            keep = [
                w
                for ws, doc in zip(encoded.doc_windows, found, strict=True)
                for w, held in zip(ws, doc.held, strict=True)
                if held or not doc.own  # a text of no tokens leaves nothing out
            ]
            own_logits = combine_windows(
                model,
                acc,
                logits[keep],
                None if vectors is None else vectors[keep],
                [encoded.window_doc[w] for w in keep],
                len(docs.texts),
                hows,
            )
        alone = encode_texts(self.tokenizer, docs.alone, self.settings, labels=docs.alone_labels)
        alone_logits = document_logits(model, alone, pad, acc, batch_size, hows)
        labels, positions = torch.tensor(docs.labels), np.array(docs.positions)
        windows = [len(ws) for ws in encoded.doc_windows]

        def accuracy(logits: torch.Tensor, gold: torch.Tensor) -> float:
            return float((logits.argmax(-1) == gold).float().mean())

        def by_position(logits: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
            return {
                position: {
                    how: accuracy(logits[how][positions == position], labels[positions == position]) for how in hows
                }
                for position in POSITIONS
            }

        return {
            "source": source,
            "hidden_training": data.hidden_training,  # what the model was trained with, for the report
            "hidden_weight": data.hidden_weight,
            "texts": len(docs.alone),
            "windows": {"min": min(windows), "mean": round(sum(windows) / len(windows), 2), "max": max(windows)},
            "accuracy": by_position(hidden),
            "text_windows_only": by_position(own_logits),
            "alone": {how: accuracy(alone_logits[how], torch.tensor(docs.alone_labels)) for how in hows},
        }

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
        """The one place `auto` is resolved: the better of mean and max on this split's metric."""
        configured = self.cfg.data.aggregation
        if self.cfg.data.long_text != "windows":
            return "mean"  # one window per text: every aggregation is the same
        if configured != "auto":
            return configured
        metric = self.cfg.train.metric
        return max(("mean", "max"), key=lambda how: (results[how].get(metric, 0.0), how == "mean"))

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


@torch.no_grad()
def window_outputs(
    model: WindowClassifier, encoded: Encoded, pad_id: int, acc: Any, batch_size: int, vectors: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every window's logits [W, C] and, with `vectors`, its pooled vector [W, H] (on acc.device), in window order.
    Each process runs its share, in batches of similar length; every process gets all of them."""
    lengths = [len(ids) for ids in encoded.window_ids]
    found: list[tuple[int, tuple[torch.Tensor, torch.Tensor | None]]] = []
    for rows in eval_order(lengths, batch_size, acc.process_index, acc.num_processes):
        batch = encoder_batch([encoded.window_ids[w] for w in rows], [encoded.window_types[w] for w in rows], pad_id)
        logits, pooled = model(**{k: v.to(acc.device) for k, v in batch.items()})  # [B, C], [B, H] or None
        logits = logits.float().cpu()
        pooled = pooled.float().cpu() if vectors and pooled is not None else None
        found.extend((w, (logits[i], None if pooled is None else pooled[i])) for i, w in enumerate(rows))
    ordered = gather_in_order(acc, found, len(lengths))
    window_logits = torch.stack([row_logits for row_logits, _ in ordered])  # [W, C]
    if not vectors:
        return window_logits, None
    return window_logits, torch.stack([row_vector for _, row_vector in ordered]).to(acc.device)  # [W, H]


@torch.no_grad()
def combine_windows(
    model: WindowClassifier,
    acc: Any,
    logits: torch.Tensor,
    vectors: torch.Tensor | None,
    window_doc: list[int],
    num_docs: int,
    hows: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """{aggregation: [D, C]} from the windows' logits [W, C] (and vectors [W, H] for the model's own pooler) of
    documents window_doc; the caller turns dropout off."""
    doc = torch.tensor(window_doc)
    out = {how: aggregate(logits, doc, num_docs, how) for how in hows if how not in POOLERS}
    for how in hows:
        if how in POOLERS:
            assert vectors is not None, "the model's own pooler needs the window vectors"
            inner = acc.unwrap_model(model)
            with torch.autocast(acc.device.type, enabled=False):
                out[how] = inner.documents(vectors, doc.to(acc.device), num_docs).float().cpu()
    return out


def document_logits(
    model: WindowClassifier, encoded: Encoded, pad_id: int, acc: Any, batch_size: int, hows: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Run every window and aggregate per document: {aggregation: [D, C]} for each of `hows`. Dropout is off."""
    with evaluating(model):
        logits, vectors = window_outputs(model, encoded, pad_id, acc, batch_size, any(h in POOLERS for h in hows))
        return combine_windows(model, acc, logits, vectors, encoded.window_doc, len(encoded.doc_windows), hows)
