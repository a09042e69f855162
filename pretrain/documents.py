"""Corpus text to tokenized documents, the first level of pretraining data (`berth.pretrain.data` draws examples
from them): the tokenizer's special ids, one word id per token (for whole-word masking) and the token offsets where
sentences end, each document tokenized once and cached as Arrow (`DOCUMENT_FEATURES`)."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from berth.core.errors import BerthError
from berth.core.text import has_cjk
from berth.corpora.embedded import hash_unit
from berth.pretrain.sentences import sentence_ends

logger = logging.getLogger(__name__)

NOT_A_WORD = -1

DOCUMENT_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "word_ids": datasets.Sequence(datasets.Value("int32")),
        "sentence_ends": datasets.Sequence(datasets.Value("int32")),
        "is_eval": datasets.Value("bool"),
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
