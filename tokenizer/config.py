from __future__ import annotations

from dataclasses import dataclass, field

from berth.corpora.config import CorpusConfig


@dataclass(frozen=True)
class WordPieceConfig:
    # Target size, special tokens included. The result can be smaller when the corpus has fewer pieces.
    vocab_size: int = 8000
    # A piece must occur this often to enter the vocabulary.
    min_frequency: int = 2
    lowercase: bool = True
    # None strips accents exactly when lowercasing, as BERT does.
    strip_accents: bool | None = None
    # At most this many distinct characters start the vocabulary; rarer ones become [UNK], so that a long
    # tail of rare characters cannot push the vocabulary past its target.
    limit_alphabet: int = 6000
    # Words longer than this many characters become one [UNK], as in BERT.
    max_input_chars_per_word: int = 100
    # Held out from training (by a hash of the text) to measure [UNK] rate and tokens per character.
    heldout_fraction: float = 0.01
    max_heldout_documents: int = 5000
    model_max_length: int = 512

    def __post_init__(self) -> None:
        if self.vocab_size <= 5:
            raise ValueError(f"vocab_size must exceed the 5 special tokens; got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1; got {self.min_frequency}")
        if self.limit_alphabet < 1:
            raise ValueError(f"limit_alphabet must be at least 1; got {self.limit_alphabet}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1); got {self.heldout_fraction}")


@dataclass(frozen=True)
class TokenizerJobConfig:
    # Where tokenizer.json, vocab.txt, tokenizer_config.json, config.yaml and summary.json go.
    output_dir: str = "runs/tokenizer/zh"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: WordPieceConfig = field(default_factory=WordPieceConfig)
