"""Tokenized documents to pretraining examples: [CLS]-task pairs or packed sentences, drawn per epoch.

Two levels, both Arrow datasets on disk under `data.cache_dir`:

1. documents (`berth.pretrain.documents`): each document tokenized once, with one word id per token (for
   whole-word masking) and the token offsets where its sentences end. Named by a hash of the corpus, the
   tokenizer and the segmenter.
2. examples for an epoch (here): `[CLS] A [SEP] B [SEP]` pairs (nsp, sop) or packed full sentences (none), drawn
   from (seed, epoch, document) so that every epoch sees new pairs without storing dupe_factor copies, and
   the same seed gives the same examples whatever the number of processes. Drawing decides each example's
   token ranges (a `Recipe`) from the sentence ends alone; its tokens are read when a batch takes it, by the
   process that trains on it.

Segments are whole sentences wherever they can be, and a pair that is still too long is truncated Google's
way (front or back of the longer segment, at random). Cutting segments mid-sentence on one side only would
let the [CLS] task be solved by looking at punctuation at the segment edges.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import datasets
import numpy as np

from berth.core.labels import IGNORE_INDEX
from berth.pretrain.columns import ListColumn, list_columns
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


class Span:
    """A token range [start, end) of one document, shortened from either end by truncation."""

    __slots__ = ("doc", "end", "start")

    def __init__(self, doc: int, start: int, end: int):
        self.doc, self.start, self.end = doc, start, end

    def __len__(self) -> int:
        return self.end - self.start


def truncate_pair(a: Span, b: Span, max_tokens: int, rng: random.Random) -> bool:
    """Google BERT's truncate_seq_pair on token ranges: drop from the front or back of the longer, at random.

    Returns True when anything was removed.
    """
    truncated = False
    while a.end - a.start + b.end - b.start > max_tokens:
        longer = a if a.end - a.start > b.end - b.start else b
        if rng.random() < 0.5:
            longer.start += 1
        else:
            longer.end -= 1
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
    """A tokenized document in memory (tests and small tools; training reads `ListColumn`s)."""

    ids: list[int]
    words: list[int]
    ends: list[int]  # token index one past each sentence


# A recipe's piece that is one [SEP] token rather than a document's range.
SEP_PIECE = (-1, 0, 1)


class Recipe(NamedTuple):
    """An example before its tokens are read: `[CLS]` and then token ranges of documents, in order.

    Drawing decides every recipe of a document from its sentence ends alone; reading the tokens (`build_example`)
    is left to the process whose batch takes the example, so each process reads only its own share.
    """

    pieces: tuple[tuple[int, int, int], ...]  # (document, start, end) token ranges; SEP_PIECE is one [SEP]
    second: int  # pieces from this index on are segment B (token type 1); len(pieces) when there is none
    label: int
    truncated: bool

    @property
    def length(self) -> int:
        return 1 + sum(end - start for _, start, end in self.pieces)


def pair_recipe(a: Span, b: Span, label: int, truncated: bool) -> Recipe:
    """[CLS] A [SEP] B [SEP]: token type 0 up to the first [SEP], 1 after it."""
    return Recipe(((a.doc, a.start, a.end), SEP_PIECE, (b.doc, b.start, b.end), SEP_PIECE), 2, label, truncated)


# Reads tokens [start, end) of a document: (input ids, word ids).
TokenReader = Callable[[int, int, int], tuple[list[int], list[int]]]


def build_example(recipe: Recipe, read: TokenReader, special: SpecialIds) -> dict[str, Any]:
    """A recipe's tokens, token types and word ids renumbered per example."""
    ids, words, first = [special.cls], [NOT_A_WORD], 0
    for k, (doc, start, end) in enumerate(recipe.pieces):
        if k == recipe.second:
            first = len(ids)
        if doc == SEP_PIECE[0]:
            ids.append(special.sep)
            words.append(NOT_A_WORD)
        else:
            piece_ids, piece_words = read(doc, start, end)
            ids.extend(piece_ids)
            words.extend(piece_words)
    first = first or len(ids)
    return {
        "input_ids": ids,
        "token_type_ids": [0] * first + [1] * (len(ids) - first),
        "word_ids": renumber(words),
        "next_sentence_label": recipe.label,
        "truncated": recipe.truncated,
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


def spans_of(ends: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) token range of every sentence, from the token offsets where sentences end."""
    return list(zip([0, *ends[:-1]], ends, strict=True))


def random_continuation(spans: list[tuple[int, int]], first: int, budget: int) -> tuple[int, int]:
    """Whole sentences of another document from sentence `first` on, as many as fit `budget` (at least one)."""
    last, length = first, 0
    while last < len(spans) and (last == first or length + spans[last][1] - spans[last][0] <= budget):
        length += spans[last][1] - spans[last][0]
        last += 1
    return first, last


def document_recipes(
    doc_index: int,
    ends: Sequence[int],
    cfg: DataConfig,
    rng: random.Random,
    ends_of: Callable[[int], Sequence[int]] | None = None,
    segments: RandomSegments | None = None,
) -> tuple[list[Recipe], int]:
    """Every recipe of `recipe_stream`, and how many sentences were left unused."""
    stream, recipes = recipe_stream(doc_index, ends, cfg, rng, ends_of, segments), []
    while True:
        try:
            recipes.append(next(stream))
        except StopIteration as end:
            return recipes, end.value


def recipe_stream(
    doc_index: int,
    ends: Sequence[int],
    cfg: DataConfig,
    rng: random.Random,
    ends_of: Callable[[int], Sequence[int]] | None = None,
    segments: RandomSegments | None = None,
) -> Generator[Recipe, None, int]:
    """Google BERT's create_instances_from_document, in whole sentences, one recipe at a time; returns how many
    sentences were left unused. Each recipe depends only on the ones before it, so the first k are the same
    however many are drawn: a process can stop at the last one it needs.

    A chunk takes whole sentences up to a target length (at least two sentences, so that there is a cut).
    A is its first 1..k-1 sentences. nsp: B is the rest of the chunk, or (half the time) whole sentences
    from another document drawn by `segments` (`ends_of(index)` gives its sentence ends), and then the chunk's
    unused sentences go back to start the next chunk. sop: B is the rest of the chunk, and half the time A and B
    are swapped.
    """
    max_tokens = cfg.max_seq_len - 3
    spans = spans_of(ends)
    lengths = [end - start for start, end in spans]
    i = 0
    while i < len(spans) - 1:
        target = target_length(max_tokens, cfg.short_seq_prob, rng)
        j, length = i, 0
        while j < len(spans) and (j - i < 2 or length + lengths[j] <= target):
            length += lengths[j]
            j += 1
        a_end = rng.randint(i + 1, j - 1)
        a = Span(doc_index, spans[i][0], spans[a_end - 1][1])
        next_i, label = j, 0
        drawn = None
        if cfg.sentence_task == "nsp" and segments is not None and rng.random() < 0.5:
            drawn = segments.draw(rng, exclude=doc_index)
        if drawn is not None and ends_of is not None:
            other = spans_of(ends_of(drawn[0]))
            first, last = random_continuation(other, drawn[1], max(1, target - len(a)))
            b = Span(drawn[0], other[first][0], other[last - 1][1])
            next_i, label = a_end, 1
        else:
            b = Span(doc_index, spans[a_end][0], spans[j - 1][1])
            if cfg.sentence_task == "sop" and rng.random() < 0.5:
                a, b, label = b, a, 1
        truncated = truncate_pair(a, b, max_tokens, rng)
        yield pair_recipe(a, b, label, truncated)
        i = next_i
    return len(spans) - i


def pack_recipes(doc_indices: Sequence[int], ends: Sequence[Sequence[int]], cfg: DataConfig) -> list[Recipe]:
    """RoBERTa's FULL-SENTENCES: whole sentences packed in order across documents, [SEP] between documents."""
    capacity = cfg.max_seq_len - 2
    recipes: list[Recipe] = []
    pieces: list[tuple[int, int, int]] = []
    used, truncated = 0, False

    def emit() -> None:
        nonlocal pieces, used, truncated
        if pieces and pieces[-1] == SEP_PIECE:
            pieces.pop()
        if pieces:
            pieces.append(SEP_PIECE)
            recipes.append(Recipe(tuple(pieces), len(pieces), IGNORE_INDEX, truncated))
        pieces, used, truncated = [], 0, False

    for doc_index, doc_ends in zip(doc_indices, ends, strict=True):
        for start, end in spans_of(doc_ends):
            cut = end - start > capacity
            end = min(end, start + capacity)
            if used + end - start > capacity:
                emit()
            truncated |= cut
            pieces.append((doc_index, start, end))
            used += end - start
        if used < capacity:
            pieces.append(SEP_PIECE)
            used += 1
        else:
            emit()
    emit()
    return recipes


def document_reader(docs: dict[int, Document]) -> TokenReader:
    def read(doc: int, start: int, end: int) -> tuple[list[int], list[int]]:
        return list(docs[doc].ids[start:end]), list(docs[doc].words[start:end])

    return read


def document_pairs(
    doc_index: int,
    doc: Document,
    cfg: DataConfig,
    special: SpecialIds,
    rng: random.Random,
    fetch: Callable[[int], Document] | None = None,
    segments: RandomSegments | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """`document_recipes` of one in-memory document, built (`fetch(index)` gives another document)."""
    docs = {doc_index: doc}

    def ends_of(index: int) -> list[int]:
        if index not in docs and fetch is not None:
            docs[index] = fetch(index)
        return docs[index].ends

    recipes, unused = document_recipes(doc_index, doc.ends, cfg, rng, ends_of, segments)
    return [build_example(r, document_reader(docs), special) for r in recipes], unused


def pack_documents(docs: list[Document], cfg: DataConfig, special: SpecialIds) -> list[dict[str, Any]]:
    """`pack_recipes` of in-memory documents, built."""
    recipes = pack_recipes(range(len(docs)), [d.ends for d in docs], cfg)
    return [build_example(r, document_reader(dict(enumerate(docs))), special) for r in recipes]


class ExampleBuilder:
    """The examples of an epoch, group by group: recipes drawn from (seed, epoch, document), built on demand."""

    def __init__(self, documents: datasets.Dataset, cfg: DataConfig, special: SpecialIds, epoch: int):
        self.documents = documents
        self.cfg = cfg
        self.special = special
        self.epoch = epoch
        self.order = None
        # Random B segments come from documents of two sentences or more, like true continuations do.
        sentences = self.columns["sentence_ends"].lengths()
        pair_docs = np.flatnonzero(sentences >= 2)
        self.segments = RandomSegments(pair_docs, sentences[pair_docs])
        if cfg.sentence_task == "none":
            # Documents are shuffled per epoch before packing, so neighbours change from epoch to epoch.
            self.order = np.random.default_rng([cfg.seed, epoch]).permutation(len(documents))

    @cached_property
    def columns(self) -> dict[str, ListColumn]:
        """Views of the documents' memory-mapped columns, made where they are used: a builder sent to a worker
        process goes as its dataset (a file name), never as the column views (which would pickle as copies)."""
        return list_columns(self.documents, ("input_ids", "word_ids", "sentence_ends"))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "columns"}

    def sentence_ends(self, index: int) -> list[int]:
        return self.columns["sentence_ends"].row(int(index)).tolist()

    def read(self, doc: int, start: int, end: int) -> tuple[list[int], list[int]]:
        columns = self.columns
        return columns["input_ids"].row(doc)[start:end].tolist(), columns["word_ids"].row(doc)[start:end].tolist()

    @property
    def per_document(self) -> bool:
        """nsp, sop: each document's recipes are drawn from it alone; none: a group's documents are packed together."""
        return self.order is None

    def document_recipes(self, index: int) -> list[Recipe]:
        """The recipes of one document (nsp, sop), drawn from (seed, epoch, document)."""
        return list(self.recipe_stream(index))

    def recipe_stream(self, index: int) -> Iterator[Recipe]:
        """`document_recipes`, drawn one at a time as they are taken."""
        rng = random.Random(f"{self.cfg.seed}-{self.epoch}-{index}")
        return recipe_stream(index, self.sentence_ends(index), self.cfg, rng, self.sentence_ends, self.segments)

    def group_documents(self, group: int) -> range:
        return range(group * GROUP_SIZE, min((group + 1) * GROUP_SIZE, len(self.documents)))

    def group_recipes(self, group: int) -> list[Recipe]:
        if self.order is not None:
            indices = self.order[self.group_documents(group)].tolist()
            return pack_recipes(indices, [self.sentence_ends(i) for i in indices], self.cfg)
        return [r for index in self.group_documents(group) for r in self.document_recipes(index)]

    def example(self, recipe: Recipe) -> dict[str, Any]:
        return build_example(recipe, self.read, self.special)

    def group_examples(self, group: int) -> list[dict[str, Any]]:
        return [self.example(r) for r in self.group_recipes(group)]
