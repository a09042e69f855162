"""Loading and writing the tokenizer files every stage reads: one loader, one vocab.txt writer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from berth.core.errors import BerthError
from berth.core.hub import hub_model_id

VOCAB_FILE = "vocab.txt"


def has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / VOCAB_FILE).is_file()


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The fast tokenizer of a directory (or hub id), with a one-line error when there is none or it will not load.

    Fast only: berth aligns words and offsets, which only the Rust tokenizers report.
    """
    path = Path(source)
    if (path.exists() or not hub_model_id(str(source))) and not has_tokenizer(path):
        raise BerthError(f"{path}: no tokenizer here (no tokenizer.json or {VOCAB_FILE}); run `berth tokenizer train`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise BerthError(f"{source}: cannot load its tokenizer: {str(exc).splitlines()[0]}") from None
    if not tokenizer.is_fast:
        raise BerthError(f"{source}: berth needs a fast tokenizer (tokenizer.json) for word alignment and offsets")
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's vocabulary and pipeline: a retrained tokenizer invalidates caches and checkpoints."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_vocab_txt(vocab: dict[str, int], path: Path) -> None:
    """vocab.txt alone rebuilds the same tokenizer with transformers' BertTokenizer (ids are line numbers)."""
    tokens = sorted(vocab.items(), key=lambda kv: kv[1])
    path.write_text("".join(f"{token}\n" for token, _ in tokens), encoding="utf-8")
