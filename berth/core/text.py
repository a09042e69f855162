"""Facts about text and vocabularies that more than one stage needs."""

from __future__ import annotations

from collections.abc import Iterable


def has_cjk(text: str) -> bool:
    """Whether `text` holds a CJK ideograph (the unified block or extension A)."""
    return any("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" for ch in text)


def vocabulary_languages(tokens: Iterable[str]) -> list[str]:
    """["zh"] when CJK characters make up much of a vocabulary; the hub's `language` field."""
    vocab = list(tokens)
    cjk = sum(1 for token in vocab if has_cjk(token))
    return ["zh"] if cjk > 0.3 * len(vocab) else []
