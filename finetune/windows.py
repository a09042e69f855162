"""Long texts in a fixed-length encoder: overlapping windows, truncation, and Google's max-context rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

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
