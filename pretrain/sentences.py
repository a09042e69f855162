"""Sentence boundaries for Chinese and English text, as character offsets."""

from __future__ import annotations

import re

# A sentence ends after Chinese 。！？； (and their half-width forms ! ? ;), an ellipsis …… or a newline,
# together with any closing quotes or brackets right after it. A full stop "." ends an English sentence
# only before whitespace or the end of the text, so 3.14, e.g. and www.example.com stay whole.
_CLOSERS = "”’」』）)》〉】\"'"
_SENTENCE_END = re.compile(rf"(?:[。！？；!?;]+|…+|\.(?=[{_CLOSERS}]*(?:\s|$)))[{_CLOSERS}]*|\n+")


def sentence_ends(text: str) -> list[int]:
    """Character offsets one past the end of each sentence; the last is always len(text) (for non-empty text)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends or ends[-1] < len(text):
        ends.append(len(text))
    # Trailing whitespace after the last stop is not a sentence of its own.
    if len(ends) > 1 and not text[ends[-2] :].strip():
        ends.pop()
        ends[-1] = len(text)
    return [e for e in ends if e > 0]


def split_sentences(text: str) -> list[str]:
    """The sentences themselves, stripped, empty ones dropped."""
    out, start = [], 0
    for end in sentence_ends(text):
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    return out
