"""Long texts in a fixed-length encoder: overlapping windows, truncation, and Google's max-context rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


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
