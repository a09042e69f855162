from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from corpora.config import CorpusConfig


@dataclass(frozen=True)
class TokenizerRef:
    # A directory holding a trained tokenizer (tokenizer.json / vocab.txt).
    path: str = "runs/tokenizer/zh"
    # How to build it when `path` holds none yet (a tokenizer config; its output_dir is set to `path`).
    # Empty: a missing tokenizer is an error.
    config: str = "configs/tokenizer/zh.yaml"


@dataclass(frozen=True)
class DataConfig:
    max_seq_len: int = 128
    # The [CLS] task: nsp (B is the next text half the time, else from another document), sop (A and B in
    # order or swapped), none (MLM only: full sentences packed across documents with [SEP] between).
    sentence_task: Literal["nsp", "sop", "none"] = "nsp"
    # Share of examples with a shorter random target length, so the model also sees short inputs.
    short_seq_prob: float = 0.1
    # Share of non-special tokens chosen for prediction; of those, mask_replace_prob become [MASK],
    # random_replace_prob a random token, and the rest stay unchanged (BERT's 80/10/10).
    mask_prob: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    # Mask whole words: every piece of a chosen word is predicted, with one 80/10/10 draw per word.
    whole_word_mask: bool = True
    # Word boundaries for whole-word masking: auto takes the corpus's own segmentation where it has one
    # (peoples_daily_words) and runs jieba on Chinese text without one; jieba always runs jieba; none
    # uses WordPiece's ## continuations only (every CJK character is then a word of its own).
    word_segmenter: Literal["auto", "jieba", "none"] = "auto"
    # Share of documents (chosen by a hash of the text) held out for evaluation.
    eval_fraction: float = 0.01
    seed: int = 0
    num_proc: int = 2
    # Prepared datasets live in a subdirectory named by a hash of everything that shapes them.
    cache_dir: str = "runs/cache"
    # Dynamic padding rounds the batch length up to a multiple of this (tensor-core friendly).
    pad_to_multiple_of: int = 8

    def __post_init__(self) -> None:
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be at least 8; got {self.max_seq_len}")
        for name in ("short_seq_prob", "mask_prob", "mask_replace_prob", "random_replace_prob", "eval_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1); got {self.mask_prob}")
        if self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise ValueError(
                "mask_replace_prob + random_replace_prob must not exceed 1; "
                f"got {self.mask_replace_prob} + {self.random_replace_prob}"
            )
        if self.num_proc < 1 or self.pad_to_multiple_of < 1:
            raise ValueError("num_proc and pad_to_multiple_of must be at least 1")


@dataclass(frozen=True)
class PretrainConfig:
    output_dir: str = "runs/pretrain/mini_zh"
    tokenizer: TokenizerRef = field(default_factory=TokenizerRef)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    data: DataConfig = field(default_factory=DataConfig)
