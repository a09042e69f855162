"""Training on text beyond the split, so that windows without the task's signal stop voting.

- Outlier exposure (Hendrycks et al. 2019): windows of unrelated text trained towards a flat distribution, a fresh
  draw of them every epoch (`data.outlier_exposure`).
- Hidden-text training (`data.hidden_training`): training texts hidden among unrelated paragraphs, among neutral
  sentences of the training texts themselves (`data.hidden_filler=in_domain`, `berth.finetune.neutral_text`), or
  half among each (`both`) (`berth.finetune.hidden_text`). Window aggregations train each window of such a
  document on what it holds; the pooled ones (attention, hierarchical) train the whole document with its text's
  label.

`build_extra_text` builds both once; `ClassificationTask.train_units` and `collate` read the one `ExtraText`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from berth.core.errors import BerthError
from berth.finetune.config import TaskData
from berth.finetune.hidden_text import HiddenSet, build_documents, outlier_paragraphs, text_windows
from berth.finetune.neutral_text import MIN_NEUTRAL_SENTENCES, training_sentences
from berth.finetune.windows import Encoded, WindowSettings, encode_texts

logger = logging.getLogger(__name__)

UNIFORM = -2  # the label of an outlier window: trained towards the uniform distribution (-1 is a missing label)
NEUTRAL_PER_DOCUMENT = 1  # hidden-text training with window aggregations: windows without the text kept per document


@dataclass
class ExtraText:
    """The extra training windows of a run: outlier windows first, then the windows (window aggregations) or the
    documents (pooled aggregations) of hidden-text training. Window i of `encoded` is training window base + i,
    so one numbering covers the training split and these."""

    base: int  # the training split's windows, numbered before these
    encoded: Encoded = field(default_factory=Encoded)
    outlier_windows: int = 0  # the first this many windows of `encoded`: a fresh draw of them each epoch
    outlier_share: float = 0.0  # outlier windows drawn per training window each epoch
    hidden_weight: float = 1.0  # each hidden-text unit's weight in the loss (a training text's is 1)
    hidden: HiddenSet = field(default_factory=HiddenSet)  # the documents hidden-text training cut its units from

    @property
    def first_hidden(self) -> int:
        """The number of the first hidden-text training window."""
        return self.base + self.outlier_windows

    @property
    def end(self) -> int:
        """One past the number of the last extra window."""
        return self.base + len(self.encoded.window_ids)

    def window_units(self, seed: int, epoch: int) -> list[list[int]]:
        """Single-window units after the training windows: this epoch's draw of outlier windows, then every
        hidden-text window."""
        units = []
        if self.outlier_windows:
            count = round(self.outlier_share * self.base)
            rng = np.random.default_rng([seed, epoch, 4])
            drawn = rng.choice(self.outlier_windows, count, replace=count > self.outlier_windows)
            units += [[self.base + int(w)] for w in drawn]
        return units + [[w] for w in range(self.first_hidden, self.end)]

    def documents(self) -> list[list[int]]:
        """The window numbers of each hidden document (pooled aggregations)."""
        return [[self.base + w for w in ws] for ws in self.encoded.doc_windows]

    def window(self, w: int) -> tuple[list[int], list[int], int]:
        """Extra window number w (base or more): (ids, token types, label)."""
        e, i = self.encoded, w - self.base
        return e.window_ids[i], e.window_types[i], e.doc_labels[e.window_doc[i]]

    def unit_weights(self, units: list[list[int]]) -> torch.Tensor | None:
        """[U] each unit's weight in the loss, or None when every unit weighs 1."""
        if self.hidden_weight == 1.0:
            return None
        return torch.tensor([self.hidden_weight if unit[0] >= self.first_hidden else 1.0 for unit in units])


def build_extra_text(
    data: TaskData,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    settings: WindowSettings,
    train: Encoded,
    train_texts: list[str],
    pooled: bool,
) -> ExtraText:
    """The run's extra training text; none unless data.outlier_exposure or data.hidden_training (the config
    refuses both with truncation, text pairs, and outlier exposure with a pooled aggregation)."""
    extra = ExtraText(base=len(train.window_ids), outlier_share=data.outlier_exposure, hidden_weight=data.hidden_weight)
    if not (data.outlier_exposure or data.hidden_training):
        return extra
    unrelated = data.outlier_exposure or data.hidden_filler != "in_domain"
    paragraphs, source = outlier_paragraphs(data.outlier_text, tokenizer) if unrelated else ([], "")  # read once
    if unrelated and not paragraphs:
        key = "data.outlier_exposure" if data.outlier_exposure else "data.hidden_training"
        raise BerthError(
            f"{key}: no unrelated text (data.outlier_text=auto takes People's Daily only for a tokenizer that "
            "covers Chinese; name a file with one paragraph a line, or use data.hidden_filler=in_domain)"
        )
    if data.outlier_exposure:
        extra.encoded = encode_texts(tokenizer, paragraphs, settings, labels=[UNIFORM] * len(paragraphs))
        extra.outlier_windows = len(extra.encoded.window_ids)
        logger.info("outlier exposure: %d windows of %s", extra.outlier_windows, source)
    if data.hidden_training:
        pools = [(paragraphs, f"{source} paragraphs")] if data.hidden_filler != "in_domain" else []
        if data.hidden_filler != "unrelated":
            sentences = training_sentences(train_texts, train.doc_labels, seed)
            if len(sentences) < MIN_NEUTRAL_SENTENCES:
                raise BerthError(
                    f"data.hidden_filler={data.hidden_filler}: {len(sentences)} neutral sentences in the training "
                    f"texts, fewer than {MIN_NEUTRAL_SENTENCES} (berth.finetune.neutral_text); use "
                    "data.hidden_filler=unrelated"
                )
            pools.append((sentences, "neutral sentences of the training texts"))
        count = round(data.hidden_training * len(train.doc_labels))
        docs = hidden_documents(train_texts, train.doc_labels, pools, tokenizer, settings, count, seed)
        logger.info(
            "hidden-text training: %d training texts among %s", len(docs.texts), " and ".join(n for _, n in pools)
        )
        extra.hidden = docs
        hidden = (
            encode_texts(tokenizer, docs.texts, settings, labels=docs.labels)
            if pooled
            else hidden_windows(docs, tokenizer, settings, seed)
        )
        extra.encoded.extend(hidden)
    return extra


def hidden_documents(
    texts: list[str],
    labels: list[int],
    pools: list[tuple[list[str], str]],
    tokenizer: PreTrainedTokenizerBase,
    settings: WindowSettings,
    count: int,
    seed: int,
) -> HiddenSet:
    """`count` training texts, each hidden at one drawn position among the text of one pool. The texts are dealt
    into one seeded share per pool, each hidden among that pool's text (with two pools, half the documents each),
    so no text is hidden twice; with one pool every text is in its share, in order."""
    half = np.random.default_rng([seed, 23]).permutation(len(texts)) % len(pools)  # [N] the pool of each text
    out = HiddenSet()
    for part, (pool, _) in enumerate(pools):
        chosen = [i for i in range(len(texts)) if half[i] == part]
        share = count // len(pools) + (part < count % len(pools))
        docs = build_documents(
            [texts[i] for i in chosen],
            [labels[i] for i in chosen],
            pool,
            tokenizer,
            settings,
            share,
            seed,
            every_position=False,
        )
        out.extend(docs, chosen)
    return out


def hidden_windows(docs: HiddenSet, tokenizer: PreTrainedTokenizerBase, settings: WindowSettings, seed: int) -> Encoded:
    """For the window aggregations: the hidden documents cut into windows, each labelled by what it holds --
    the text's label when it holds at least half of the text, UNIFORM when it holds none of it (at most
    NEUTRAL_PER_DOCUMENT of those per document, drawn), left out in between. A window then learns to speak
    for the verdict it contains, whatever surrounds it, and to stay flat when it contains none, so the one
    window with the verdict decides the document. For the pooled aggregations the documents are trained whole
    (multiple-instance learning), so the pooler learns to find the verdict among windows that have none."""
    rng = np.random.default_rng([seed, 6])
    out = Encoded()
    for d, doc in enumerate(text_windows(tokenizer, docs, settings)):
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
