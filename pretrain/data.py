"""Tokenized documents to pretraining examples: [CLS]-task pairs or packed sentences, drawn per epoch.

Two levels, both Arrow datasets on disk under `data.cache_dir`:

1. documents (`berth.pretrain.documents`): each document tokenized once, with one word id per token (for
   whole-word masking) and the token offsets where its sentences end. Named by a hash of the corpus, the
   tokenizer and the segmenter.
2. examples for an epoch (here): `[CLS] A [SEP] B [SEP]` pairs (nsp, sop) or packed full sentences (none), drawn
   from (seed, epoch, document) so that every epoch sees new pairs without storing dupe_factor copies, and
   the same seed gives the same examples whatever the number of processes.

Segments are whole sentences wherever they can be, and a pair that is still too long is truncated Google's
way (front or back of the longer segment, at random). Cutting segments mid-sentence on one side only would
let the [CLS] task be solved by looking at punctuation at the segment edges.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from berth.core.labels import IGNORE_INDEX
from berth.pretrain.config import DataConfig
from berth.pretrain.documents import NOT_A_WORD, SpecialIds

logger = logging.getLogger(__name__)

# Bump when the layout of cached datasets or the way examples are drawn changes, so old caches are rebuilt.
FORMAT_VERSION = 2
# Documents per unit of work when drawing examples. Fixed, so results do not depend on num_proc.
GROUP_SIZE = 256
EXAMPLE_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "token_type_ids": datasets.Sequence(datasets.Value("int8")),
        "word_ids": datasets.Sequence(datasets.Value("int32")),
        "next_sentence_label": datasets.Value("int8"),
        "truncated": datasets.Value("bool"),
    }
)


def truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> bool:
    """Google BERT's truncate_seq_pair on index lists: drop from the front or back of the longer, at random.

    Returns True when anything was removed.
    """
    truncated = False
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
        truncated = True
    return truncated


def renumber(word_ids: Sequence[int]) -> list[int]:
    """Word ids 0, 1, 2, ... in order of appearance; -1 (special tokens) kept and ends a word."""
    out, last, current = [], None, -1
    for w in word_ids:
        if w == NOT_A_WORD:
            out.append(NOT_A_WORD)
            last = None
            continue
        if w != last:
            current += 1
            last = w
        out.append(current)
    return out


@dataclass
class Document:
    ids: list[int]
    words: list[int]
    ends: list[int]  # token index one past each sentence

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Document:
        return cls(row["input_ids"], row["word_ids"], row["sentence_ends"])

    @property
    def spans(self) -> list[tuple[int, int]]:
        return list(zip([0, *self.ends[:-1]], self.ends, strict=True))


@dataclass
class Segment:
    """Token positions of one document; truncation removes positions, so ids and word ids stay in step."""

    doc: Document
    positions: list[int]

    @classmethod
    def of(cls, doc: Document, first: int, last: int) -> Segment:
        spans = doc.spans
        return cls(doc, list(range(spans[first][0], spans[last - 1][1])))

    def ids(self) -> list[int]:
        return [self.doc.ids[p] for p in self.positions]

    def words(self) -> list[int]:
        return [self.doc.words[p] for p in self.positions]


def pair_example(a: Segment, b: Segment, label: int, truncated: bool, special: SpecialIds) -> dict[str, Any]:
    """[CLS] A [SEP] B [SEP] with token_type_ids 0 / 1 and word ids renumbered per example."""
    ids = [special.cls, *a.ids(), special.sep, *b.ids(), special.sep]
    words = renumber([NOT_A_WORD, *a.words(), NOT_A_WORD, *b.words(), NOT_A_WORD])
    types = [0] * (len(a.positions) + 2) + [1] * (len(b.positions) + 1)
    return {
        "input_ids": ids,
        "token_type_ids": types,
        "word_ids": words,
        "next_sentence_label": label,
        "truncated": truncated,
    }


def target_length(max_tokens: int, short_seq_prob: float, rng: random.Random) -> int:
    return rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens


class RandomSegments:
    """Where random B segments start: a sentence (not the first) of a document with two or more sentences.

    Drawn uniformly over all such sentences, not over documents: true continuations come from each document
    in proportion to its sentences, so random ones must too, or a corpus of long articles and short reviews
    would give random B segments a review's style (and its missing final stop) far more often than true ones.
    """

    def __init__(self, doc_indices: Sequence[int] | np.ndarray, sentence_counts: Sequence[int] | np.ndarray):
        self.docs = np.asarray(doc_indices, dtype=np.int64)
        # Document i offers sentence_counts[i] - 1 start sentences (its 2nd, 3rd, ...).
        self.ends = np.cumsum(np.asarray(sentence_counts, dtype=np.int64) - 1)

    def draw(self, rng: random.Random, exclude: int) -> tuple[int, int] | None:
        """(document, first sentence) of a random B segment outside document `exclude`; None if none exists."""
        total = int(self.ends[-1]) if len(self.ends) else 0
        for _ in range(10):
            if total == 0:
                return None
            slot = rng.randrange(total)
            k = int(np.searchsorted(self.ends, slot, side="right"))
            if int(self.docs[k]) != exclude:
                previous = int(self.ends[k - 1]) if k else 0
                return int(self.docs[k]), 1 + slot - previous
        return None


def random_continuation(other: Document, first: int, budget: int) -> tuple[int, int]:
    """Whole sentences of `other` from sentence `first` on, as many as fit `budget` (at least one)."""
    spans = other.spans
    last, length = first, 0
    while last < len(spans) and (last == first or length + spans[last][1] - spans[last][0] <= budget):
        length += spans[last][1] - spans[last][0]
        last += 1
    return first, last


def document_pairs(
    doc_index: int,
    doc: Document,
    cfg: DataConfig,
    special: SpecialIds,
    rng: random.Random,
    fetch: Any = None,
    segments: RandomSegments | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Google BERT's create_instances_from_document, in whole sentences. Returns (examples, unused sentences).

    A chunk takes whole sentences up to a target length (at least two sentences, so that there is a cut).
    A is its first 1..k-1 sentences. nsp: B is the rest of the chunk, or (half the time) whole sentences
    from another document drawn by `segments` (`fetch(index)` reads one), and then the chunk's unused sentences go
    back to start the next chunk. sop: B is the rest of the chunk, and half the time A and B are swapped.
    """
    max_tokens = cfg.max_seq_len - 3
    spans = doc.spans
    lengths = [end - start for start, end in spans]
    examples: list[dict[str, Any]] = []
    i = 0
    while i < len(spans) - 1:
        target = target_length(max_tokens, cfg.short_seq_prob, rng)
        j, length = i, 0
        while j < len(spans) and (j - i < 2 or length + lengths[j] <= target):
            length += lengths[j]
            j += 1
        a_end = rng.randint(i + 1, j - 1)
        a = Segment.of(doc, i, a_end)
        next_i, label = j, 0
        drawn = None
        if cfg.sentence_task == "nsp" and segments is not None and rng.random() < 0.5:
            drawn = segments.draw(rng, exclude=doc_index)
        if drawn is not None:
            other = fetch(drawn[0])
            b = Segment.of(other, *random_continuation(other, drawn[1], max(1, target - len(a.positions))))
            next_i, label = a_end, 1
        else:
            b = Segment.of(doc, a_end, j)
            if cfg.sentence_task == "sop" and rng.random() < 0.5:
                a, b, label = b, a, 1
        truncated = truncate_pair(a.positions, b.positions, max_tokens, rng)
        examples.append(pair_example(a, b, label, truncated, special))
        i = next_i
    return examples, len(spans) - i


def pack_documents(docs: list[Document], cfg: DataConfig, special: SpecialIds) -> list[dict[str, Any]]:
    """RoBERTa's FULL-SENTENCES: whole sentences packed in order across documents, [SEP] between documents."""
    capacity = cfg.max_seq_len - 2
    examples: list[dict[str, Any]] = []
    ids: list[int] = []
    words: list[int] = []
    truncated = False

    def emit() -> None:
        nonlocal ids, words, truncated
        if ids and ids[-1] == special.sep:
            ids, words = ids[:-1], words[:-1]
        if ids:
            examples.append(
                {
                    "input_ids": [special.cls, *ids, special.sep],
                    "token_type_ids": [0] * (len(ids) + 2),
                    "word_ids": renumber([NOT_A_WORD, *words, NOT_A_WORD]),
                    "next_sentence_label": IGNORE_INDEX,
                    "truncated": truncated,
                }
            )
        ids, words, truncated = [], [], False

    for doc in docs:
        for start, end in doc.spans:
            cut = end - start > capacity
            end = min(end, start + capacity)
            if len(ids) + end - start > capacity:
                emit()
            truncated |= cut
            ids.extend(doc.ids[start:end])
            words.extend(doc.words[start:end])
        if len(ids) < capacity:
            ids.append(special.sep)
            words.append(NOT_A_WORD)
        else:
            emit()
    emit()
    return examples


class ExampleBuilder:
    """Batched `datasets.map` function over group numbers: each group of documents gives its examples."""

    def __init__(self, documents: datasets.Dataset, cfg: DataConfig, special: SpecialIds, epoch: int):
        self.documents = documents
        self.cfg = cfg
        self.special = special
        self.epoch = epoch
        self.order = None
        # Random B segments come from documents of two sentences or more, like true continuations do.
        sentences = pc.list_value_length(documents.with_format("arrow")["sentence_ends"]).to_numpy()
        pair_docs = np.flatnonzero(sentences >= 2)
        self.segments = RandomSegments(pair_docs, sentences[pair_docs])
        if cfg.sentence_task == "none":
            # Documents are shuffled per epoch before packing, so neighbours change from epoch to epoch.
            self.order = np.random.default_rng([cfg.seed, epoch]).permutation(len(documents))

    def fetch(self, index: int) -> Document:
        return Document.from_row(self.documents[int(index)])

    def _documents(self, indices: Any) -> list[Document]:
        rows = self.documents[indices]
        columns = (rows["input_ids"], rows["word_ids"], rows["sentence_ends"])
        return [Document(*row) for row in zip(*columns, strict=True)]

    def group_examples(self, group: int) -> list[dict[str, Any]]:
        lo, hi = group * GROUP_SIZE, min((group + 1) * GROUP_SIZE, len(self.documents))
        if self.order is not None:
            return pack_documents(self._documents(self.order[lo:hi].tolist()), self.cfg, self.special)
        examples = []
        for index, doc in enumerate(self._documents(slice(lo, hi)), start=lo):
            rng = random.Random(f"{self.cfg.seed}-{self.epoch}-{index}")
            pairs, _ = document_pairs(index, doc, self.cfg, self.special, rng, self.fetch, self.segments)
            examples.extend(pairs)
        return examples

    def __call__(self, batch: dict[str, list[int]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in EXAMPLE_FEATURES}
        for group in batch["group"]:
            for example in self.group_examples(group):
                for name in EXAMPLE_FEATURES:
                    out[name].append(example[name])
        return out
