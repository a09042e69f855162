"""Corpus to pretraining examples: tokenized documents (cached once) and [CLS]-task examples drawn per epoch.

Two levels, both Arrow datasets on disk under `data.cache_dir`:

1. documents: each document tokenized once, with one word id per token (for whole-word masking) and the
   token offsets where its sentences end. Named by a hash of the corpus, the tokenizer and the segmenter.
2. examples for an epoch: `[CLS] A [SEP] B [SEP]` pairs (nsp, sop) or packed full sentences (none), drawn
   from (seed, epoch, document) so that every epoch sees new pairs without storing dupe_factor copies, and
   the same seed gives the same examples whatever the number of processes.

Segments are whole sentences wherever they can be, and a pair that is still too long is truncated Google's
way (front or back of the longer segment, at random). Cutting segments mid-sentence on one side only would
let the [CLS] task be solved by looking at punctuation at the segment edges.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from berth.core.errors import BerthError
from berth.core.labels import IGNORE_INDEX
from berth.core.text import has_cjk
from berth.corpora.embedded import hash_unit
from berth.pretrain.config import DataConfig
from berth.pretrain.sentences import sentence_ends

logger = logging.getLogger(__name__)

# Bump when the layout of cached datasets or the way examples are drawn changes, so old caches are rebuilt.
FORMAT_VERSION = 2
# Documents per unit of work when drawing examples. Fixed, so results do not depend on num_proc.
GROUP_SIZE = 256
NOT_A_WORD = -1

DOCUMENT_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "word_ids": datasets.Sequence(datasets.Value("int32")),
        "sentence_ends": datasets.Sequence(datasets.Value("int32")),
        "is_eval": datasets.Value("bool"),
    }
)
EXAMPLE_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "token_type_ids": datasets.Sequence(datasets.Value("int8")),
        "word_ids": datasets.Sequence(datasets.Value("int32")),
        "next_sentence_label": datasets.Value("int8"),
        "truncated": datasets.Value("bool"),
    }
)


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int
    vocab_size: int

    @property
    def all(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str = "tokenizer") -> SpecialIds:
    """The special-token ids pretraining needs, or a one-line error naming what is missing or inconsistent."""
    names = ("pad", "unk", "cls", "sep", "mask")
    found = {name: getattr(tokenizer, f"{name}_token_id", None) for name in names}
    missing = [f"[{n.upper()}]" for n, i in found.items() if i is None]
    if missing:
        raise BerthError(
            f"{where}: the tokenizer has no {', '.join(missing)} token; pretraining needs all of "
            "[PAD] [UNK] [CLS] [SEP] [MASK]"
        )
    ids: dict[str, int] = {name: int(i) for name, i in found.items() if i is not None}
    vocab_size = len(tokenizer)
    vocab_file = Path(getattr(tokenizer, "name_or_path", "") or ".") / "vocab.txt"
    if vocab_file.is_file():
        lines = vocab_file.read_text(encoding="utf-8").splitlines()
        if len(lines) != vocab_size:
            raise BerthError(
                f"{vocab_file}: {len(lines)} entries, but the tokenizer has {vocab_size}; "
                "the vocabulary does not match tokenizer.json"
            )
        for name, i in ids.items():
            token = getattr(tokenizer, f"{name}_token")
            if lines[i] != token:
                raise BerthError(f"{vocab_file}: line {i + 1} is {lines[i]!r}, but the tokenizer gives {token} id {i}")
    if len(set(ids.values())) != len(ids) or max(ids.values()) >= vocab_size:
        raise BerthError(
            f"{where}: special token ids {ids} are not distinct ids below the vocabulary size {vocab_size}"
        )
    return SpecialIds(vocab_size=vocab_size, **ids)


def check_seq_len(max_seq_len: int, limit: int, what: str) -> None:
    if max_seq_len > limit:
        raise BerthError(f"data.max_seq_len={max_seq_len} is beyond {what} ({limit}); lower data.max_seq_len")


# ---------------------------------------------------------------------------------------------------------------
# Documents: tokens, word ids and sentence ends


def continuation_mask(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """(vocab,) bool: True for WordPiece continuation pieces (##...), which always belong to the previous word."""
    mask = np.zeros(len(tokenizer), dtype=bool)
    for token, i in tokenizer.get_vocab().items():
        mask[i] = token.startswith("##")
    return mask


def word_start_offsets(text: str, words: Sequence[str] | None) -> list[int] | None:
    """Character offsets where the given words start in `text`; None when they do not line up with it."""
    if not words:
        return None
    starts, pos = [], 0
    for word in words:
        found = text.find(word, pos)
        if found < 0 or text[pos:found].strip():
            return None
        starts.append(found)
        pos = found + len(word)
    return starts


def align_words(
    offsets: Sequence[tuple[int, int]], ids: Sequence[int], continuation: np.ndarray, starts: list[int] | None
) -> list[int]:
    """One word id per token (0, 1, 2, ... in order).

    A ## piece continues the previous token's word. Otherwise a token starts a new word when no segmentation
    is given, or when it lies in a different segmented word than the previous token. A token that straddles
    two segmented words stays whole and goes with the word it starts in.
    """
    word_ids: list[int] = []
    current, previous_word = -1, None
    for (start, _), token in zip(offsets, ids, strict=True):
        if current >= 0 and continuation[token]:
            word_ids.append(current)
            continue
        word = bisect.bisect_right(starts, start) - 1 if starts is not None else None
        if starts is None or word != previous_word or current < 0:
            current += 1
        previous_word = word
        word_ids.append(current)
    return word_ids


def sentence_token_ends(offsets: Sequence[tuple[int, int]], char_ends: Sequence[int]) -> list[int]:
    """Token index one past each sentence, from the sentences' character ends. Empty sentences vanish."""
    ends: list[int] = []
    s = 0
    for t, (start, _) in enumerate(offsets):
        while s < len(char_ends) and start >= char_ends[s]:
            if t > (ends[-1] if ends else 0):
                ends.append(t)
            s += 1
    if offsets and (not ends or ends[-1] < len(offsets)):
        ends.append(len(offsets))
    return ends


class DocumentEncoder:
    """Batched `datasets.map` function: text (and words) to input_ids, word_ids, sentence_ends, is_eval."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, segmenter: str, eval_fraction: float):
        self.tokenizer = tokenizer
        self.segmenter = segmenter
        self.eval_fraction = eval_fraction
        self.continuation = continuation_mask(tokenizer)

    def _segment(self, text: str, words: Sequence[str] | None) -> list[int] | None:
        if self.segmenter == "none":
            return None
        if self.segmenter == "auto" and words:
            return word_start_offsets(text, words)
        if not has_cjk(text):
            return None  # ## continuations already give English words
        import jieba

        jieba.setLogLevel(logging.WARNING)
        starts, pos = [], 0
        for piece in jieba.lcut(text):
            starts.append(pos)
            pos += len(piece)
        return starts

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = batch["text"]
        all_words = batch.get("words") or [None] * len(texts)
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        out: dict[str, list[Any]] = {name: [] for name in DOCUMENT_FEATURES}
        for text, words, ids, offsets in zip(
            texts, all_words, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            if not ids:
                continue
            out["input_ids"].append(ids)
            out["word_ids"].append(align_words(offsets, ids, self.continuation, self._segment(text, words)))
            out["sentence_ends"].append(sentence_token_ends(offsets, sentence_ends(text)))
            out["is_eval"].append(hash_unit(text) < self.eval_fraction)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Examples: pairs for nsp / sop, packed sentences for none


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
