from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class CorpusConfig:
    """Where the text comes from and how to read it."""

    # Each item: an embedded corpus name (peoples_daily, peoples_daily_words, reviews_sentiment[:SPLIT]),
    # a local file, directory or glob, or hf:OWNER/NAME for a hub dataset.
    sources: tuple[str, ...] = ("peoples_daily",)
    # File format; auto tells it from the suffix (.txt, .jsonl/.json, .csv, .tsv, .parquet).
    format: Literal["auto", "text", "jsonl", "csv", "tsv", "parquet"] = "auto"
    # Plain text: one document a line, or documents separated by blank lines.
    documents: Literal["line", "blank_line"] = "line"
    # Column (JSON lines, CSV/TSV, Parquet, hub) that holds the text.
    text_column: str = "text"
    hub_config: str = ""
    hub_split: str = "train"
    # Iterate without materialising: for corpora larger than memory.
    streaming: bool = False
    # Lines that are not valid UTF-8: stop with file and line, or skip them and count (text and JSON lines).
    on_decode_error: Literal["error", "skip"] = "error"
    # Sources whose texts are removed from this corpus, e.g. reviews_sentiment:test so that
    # pretraining never sees the texts that fine-tuning is evaluated on.
    exclude: tuple[str, ...] = ()
