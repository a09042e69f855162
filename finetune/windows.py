"""How a text becomes windows: overlapping windows, truncation, text pairs, and Google's max-context rule.

`encode_texts` cuts a split into `Encoded` windows; training, evaluation and `berth predict` all cut through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


@dataclass(frozen=True)
class WindowSettings:
    """How a fine-tuned model reads a text of any length. Written whole into the exported config.json (key
    "berth") and read back whole by predict (`WindowSettings(**saved)`), so both cut and combine alike."""

    task: str = "classification"  # classification | ner
    max_seq_len: int = 128
    stride: int = 64  # tokens between window starts
    long_text: str = "windows"  # windows | head | tail | head_tail (classification)
    head_fraction: float = 0.25  # head_tail: the share of the room taken from the head
    # How window outputs become a document's: mean | max | prob_mean | confidence | margin | attention |
    # hierarchical; "auto" only while training, until validation
    # chooses (ClassificationTask.choose_aggregation, the one place it is resolved).
    aggregation: str = "mean"
    text_pair: bool = False  # the model classifies text pairs (predict then needs both texts)

    @classmethod
    def from_data(cls, task: str, data: Any) -> WindowSettings:
        """The settings of a fine-tuning config's data section."""
        return cls(
            task,
            data.max_seq_len,
            data.stride,
            data.long_text,
            data.head_fraction,
            data.aggregation,
            bool(data.text_pair_column),
        )

    @classmethod
    def for_checkpoint(cls, task: str, max_position_embeddings: int) -> WindowSettings:
        """For a classifier berth did not train: windows as long as the model takes, half overlapping."""
        size = min(max_position_embeddings, 512)
        return cls(task, size, size // 2)


def window_spans(length: int, size: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) spans of at most `size` tokens covering `length` tokens, starts `stride` apart.

    The last window is aligned to the end of the text, so it is full length and the tail gets a whole
    window of context rather than a short remainder. A text that fits gives one span; an empty text one
    empty span (it still yields a [CLS] [SEP] input).
    """
    if size < 1 or stride < 1:
        raise ValueError(f"window size and stride must be at least 1; got {size}, {stride}")
    if length <= size:
        return [(0, length)]
    spans = []
    start = 0
    while start + size < length:
        spans.append((start, start + size))
        start += stride
    spans.append((length - size, length))
    return spans


def truncate(ids: Sequence[T], size: int, strategy: str, head_fraction: float = 0.25) -> list[T]:
    """Keep `size` tokens of `ids`: the head, the tail, or head_fraction of them from the head and the rest from
    the tail (head_tail)."""
    ids = list(ids)
    if len(ids) <= size:
        return ids
    if strategy == "head":
        return ids[:size]
    if strategy == "tail":
        return ids[len(ids) - size :]
    if strategy == "head_tail":
        head = round(size * head_fraction)
        return ids[:head] + ids[len(ids) - (size - head) :]
    raise ValueError(f"unknown truncation strategy {strategy!r}; choose head, tail or head_tail")


def max_context_owner(spans: Sequence[tuple[int, int]], length: int) -> list[int]:
    """For each token position, the index of the span in which it has the most context.

    Google's BERT (run_squad.py `_check_is_max_context`): the score of a position in a span is
    min(tokens to its left, tokens to its right) + 0.01 x span length; the first span with the best
    score wins. A position no span covers gets -1.
    """
    owner = [-1] * length
    best = [float("-inf")] * length
    for index, (start, end) in enumerate(spans):
        for position in range(start, min(end, length)):
            score = min(position - start, end - 1 - position) + 0.01 * (end - start)
            if score > best[position]:
                best[position], owner[position] = score, index
    return owner


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
