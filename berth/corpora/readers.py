"""Readers that turn local files, hub datasets and the embedded corpora into one `datasets` dataset.

Plain text and JSON lines are read by berth's own generators so that a bad line is reported with its file
and line number (or skipped and counted); CSV/TSV and Parquet go through the datasets library's builders.
Either way the result is Arrow-backed (memory-mapped, cached) or, with `streaming`, an IterableDataset.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TypeAlias

import datasets

from berth.core.errors import BerthError
from berth.core.hub import require_hub
from berth.corpora.config import CorpusConfig
from berth.corpora.embedded import NAMED_CORPORA

logger = logging.getLogger(__name__)

Corpus: TypeAlias = datasets.Dataset | datasets.IterableDataset

SUFFIX_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
HUB_PREFIX = "hf:"


def load_corpus(cfg: CorpusConfig, cache_dir: str | None = None, num_proc: int | None = None) -> Corpus:
    """All sources of `cfg` as one dataset with a `text` column (and `words` when every source has them).
    `cache_dir`: where the Arrow files read from text, JSON lines, CSV and Parquet go (default: datasets' cache),
    so that a caller can remove them when it is done. `num_proc`: processes reading a source's files, each its
    share of them (a source of one file is read by one); the rows keep the files' order."""
    if not cfg.sources:
        raise BerthError("corpus.sources is empty: name at least one file, glob, embedded corpus or hf:NAME")
    parts = [load_source(source, cfg, cache_dir, num_proc) for source in cfg.sources]
    shared = set.intersection(*(set(p.column_names or ["text"]) for p in parts))
    keep = ["text", "words"] if "words" in shared else ["text"]
    parts = [p.select_columns(keep) for p in parts]
    corpus = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if cfg.exclude:
        corpus = _exclude_texts(corpus, cfg)
    _require_nonempty(corpus, cfg)
    return corpus


def load_source(source: str, cfg: CorpusConfig, cache_dir: str | None = None, num_proc: int | None = None) -> Corpus:
    if source in NAMED_CORPORA:
        dataset = NAMED_CORPORA[source]()
        return dataset.to_iterable_dataset() if cfg.streaming else dataset
    if source.startswith(HUB_PREFIX):
        return _load_hub(source[len(HUB_PREFIX) :], cfg)
    files = resolve_files(source)
    formats = {detect_format(f, cfg.format) for f in files}
    if len(formats) > 1:
        raise BerthError(f"corpus source '{source}' mixes formats ({', '.join(sorted(formats))}); list them apart")
    (fmt,) = formats
    if fmt in ("text", "jsonl"):
        return _from_line_files(files, fmt, cfg, cache_dir, num_proc)
    return _from_builder(files, fmt, cfg, cache_dir, num_proc)


def resolve_files(source: str) -> list[Path]:
    """A file, a directory (every file below it) or a glob; an error when nothing matches."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        known = ", ".join(NAMED_CORPORA)
        raise BerthError(
            f"corpus source '{source}': no such file, directory or glob match "
            f"(embedded corpora are: {known}; hub datasets are written hf:OWNER/NAME)"
        )
    return files


def detect_format(path: Path, configured: str) -> str:
    if configured != "auto":
        return configured
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BerthError(f"{path}: cannot tell the format from the suffix '{path.suffix}'; set corpus.format")
    return fmt


def _fingerprint(files: list[Path]) -> list[tuple[str, int, int]]:
    # Part of the generator's arguments, so the datasets cache is rebuilt whenever a file changes.
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _from_line_files(
    files: list[Path], fmt: str, cfg: CorpusConfig, cache_dir: str | None, num_proc: int | None
) -> Corpus:
    gen_kwargs = {
        "files": _fingerprint(files),
        "fmt": fmt,
        "documents": cfg.documents,
        "text_column": cfg.text_column,
        "on_decode_error": cfg.on_decode_error,
    }
    features = datasets.Features({"text": datasets.Value("string")})
    if cfg.streaming:
        return datasets.IterableDataset.from_generator(_read_line_files, features=features, gen_kwargs=gen_kwargs)
    try:
        return datasets.Dataset.from_generator(
            _read_line_files,
            features=features,
            gen_kwargs=gen_kwargs,
            cache_dir=cache_dir,
            # datasets gives each process a share of the list of files
            num_proc=min(num_proc, len(files)) if num_proc and len(files) > 1 else None,
        )
    except datasets.exceptions.DatasetGenerationError as exc:
        # Our own one-line error, raised inside the generator, arrives wrapped by the builder.
        if isinstance(exc.__cause__, BerthError):
            raise exc.__cause__ from None
        raise
    except ValueError as exc:
        if "corresponds to no data" not in str(exc):  # datasets' way of saying the generator yielded nothing
            raise
        return datasets.Dataset.from_dict({"text": []}, features=features)


def _read_line_files(
    files: list[tuple[str, int, int]], fmt: str, documents: str, text_column: str, on_decode_error: str
) -> Iterator[dict[str, str]]:
    for name, _, _ in files:
        reader = iter_text_documents if fmt == "text" else iter_jsonl_documents
        for text in reader(Path(name), documents=documents, text_column=text_column, on_decode_error=on_decode_error):
            yield {"text": text}


def _decoded_lines(path: Path, on_decode_error: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for each line; a line that is not UTF-8 stops the run or is skipped and counted."""
    skipped = 0
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise BerthError(f"{path}: cannot read: {exc.strerror}") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if on_decode_error == "skip":
                    skipped += 1
                    continue
                raise BerthError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                    "convert the file, or set corpus.on_decode_error=skip to skip such lines"
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            yield lineno, line.rstrip("\r\n")
    if skipped:
        logger.warning("%s: skipped %d line(s) that are not valid UTF-8", path, skipped)


def iter_text_documents(
    path: Path, documents: str = "line", on_decode_error: str = "error", **_options: str
) -> Iterator[str]:
    """Documents of a plain-text file: each non-empty line, or blocks separated by blank lines."""
    block: list[str] = []
    for _, line in _decoded_lines(path, on_decode_error):
        text = line.strip()
        if documents == "line":
            if text:
                yield text
        elif text:
            block.append(text)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def iter_jsonl_documents(
    path: Path, text_column: str = "text", on_decode_error: str = "error", **_options: str
) -> Iterator[str]:
    for lineno, line in _decoded_lines(path, on_decode_error):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BerthError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict) or text_column not in record:
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise BerthError(f"{path}:{lineno}: no '{text_column}' field (fields: {fields}); set corpus.text_column")
        text = record[text_column]
        if not isinstance(text, str):
            raise BerthError(f"{path}:{lineno}: field '{text_column}' is {type(text).__name__}, not text")
        if text.strip():
            yield text.strip()


def check_utf8(path: Path) -> None:
    for _ in _decoded_lines(path, "error"):
        pass


def _from_builder(
    files: list[Path], fmt: str, cfg: CorpusConfig, cache_dir: str | None, num_proc: int | None
) -> Corpus:
    if fmt in ("csv", "tsv"):
        for f in files:
            check_utf8(f)  # pandas would fail with a stack trace and no line number
        builder, kwargs = "csv", {"delimiter": "\t" if fmt == "tsv" else ","}
    else:
        builder, kwargs = "parquet", {}
    try:
        dataset = datasets.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            streaming=cfg.streaming,
            cache_dir=cache_dir,
            num_proc=None if cfg.streaming or not num_proc or len(files) < 2 else min(num_proc, len(files)),
            **kwargs,
        )
    except Exception as exc:  # the builders raise many types; the user needs the file and the reason
        raise BerthError(f"{files[0] if len(files) == 1 else files}: cannot read as {fmt}: {exc}") from None
    where = str(files[0]) if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more)"
    return _text_column(dataset, cfg.text_column, where)


def _text_column(dataset: Corpus, column: str, where: str) -> Corpus:
    columns = dataset.column_names
    if columns is not None and column not in columns:
        raise BerthError(f"{where}: no column '{column}' (columns: {', '.join(columns)}); set corpus.text_column")
    dataset = dataset.select_columns([column])
    if column != "text":
        dataset = dataset.rename_column(column, "text")
    return dataset.filter(lambda row: isinstance(row["text"], str) and bool(row["text"].strip()))


def _load_hub(name: str, cfg: CorpusConfig) -> Corpus:
    require_hub(f"corpus source 'hf:{name}'")
    try:
        dataset = datasets.load_dataset(
            name, cfg.hub_config or None, split=cfg.hub_split, streaming=cfg.streaming, token=os.environ.get("HF_TOKEN")
        )
    except Exception as exc:
        raise BerthError(f"corpus source 'hf:{name}': cannot load from the hub: {exc}") from None
    return _text_column(dataset, cfg.text_column, f"hf:{name}")


def _exclude_texts(corpus: Corpus, cfg: CorpusConfig) -> Corpus:
    plain = dataclasses.replace(cfg, sources=cfg.exclude, exclude=(), streaming=False)
    excluded = {t.strip() for source in plain.sources for t in load_source(source, plain)["text"]}
    return corpus.filter(lambda row: row["text"].strip() not in excluded)


def _require_nonempty(corpus: Corpus, cfg: CorpusConfig) -> None:
    if isinstance(corpus, datasets.IterableDataset):
        empty = next(iter(corpus.take(1)), None) is None
    else:
        empty = corpus.num_rows == 0
    if empty:
        raise BerthError(f"the corpus is empty: sources {', '.join(cfg.sources)} hold no non-empty document")
