"""Labelled data for fine-tuning: embedded datasets, local files or the hub, checked before any training starts."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from berth.core.errors import BerthError
from berth.core.hub import require_hub
from berth.corpora.embedded import peoples_daily_ner, reviews_sentiment
from berth.corpora.readers import check_utf8, detect_format
from berth.finetune.config import TaskData

EMBEDDED = {"reviews_sentiment": reviews_sentiment, "peoples_daily_ner": peoples_daily_ner}
BUILDERS = {"jsonl": "json", "csv": "csv", "tsv": "csv", "parquet": "parquet"}
SPLIT_FILES = {"train": "train_file", "validation": "validation_file", "test": "test_file"}


@dataclass(frozen=True)
class Split:
    name: str
    rows: datasets.Dataset
    where: str  # for messages: a file path, or dataset:split


def content_digest(value: Any) -> str:
    """A short hash of nested lists of ids and labels."""
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()[:16]


def load_splits(data: TaskData) -> dict[str, Split]:
    """train and validation (required) and test (optional), from data.dataset or the data.*_file paths."""
    if data.dataset:
        if any(getattr(data, key) for key in SPLIT_FILES.values()):
            raise BerthError("set either data.dataset or data.train_file/validation_file/test_file, not both")
        found = _load_named(data.dataset, data.hub_config)
        splits = {name: Split(name, rows, f"{data.dataset}:{name}") for name, rows in found.items()}
    else:
        splits = {
            name: Split(name, _load_file(Path(getattr(data, key)), f"data.{key}"), getattr(data, key))
            for name, key in SPLIT_FILES.items()
            if getattr(data, key)
        }
    for keep, names in ((data.max_examples, tuple(splits)), (data.train_examples, ("train",))):
        if keep:  # a seeded shuffle first: datasets are often sorted by label, and the first N rows would be one class
            splits.update(
                {
                    name: Split(name, s.rows.shuffle(seed=0).select(range(min(keep, s.rows.num_rows))), s.where)
                    for name, s in splits.items()
                    if name in names
                }
            )
    for required in ("train", "validation"):
        if required not in splits:
            raise BerthError(
                f"no {required} split: set data.{SPLIT_FILES[required]} (or data.dataset to a dataset that has one)"
            )
        if splits[required].rows.num_rows == 0:
            raise BerthError(f"{splits[required].where}: the {required} split is empty")
    return {name: splits[name] for name in SPLIT_FILES if name in splits}


def _load_named(name: str, hub_config: str) -> dict[str, datasets.Dataset]:
    if name in EMBEDDED:
        return dict(EMBEDDED[name]())
    if not name.startswith("hf:"):
        raise BerthError(
            f"data.dataset={name!r}: not an embedded dataset ({', '.join(EMBEDDED)}) nor hf:OWNER/NAME; "
            "for local files leave data.dataset empty and set data.train_file and data.validation_file"
        )
    require_hub(f"data.dataset={name}")
    try:
        found = datasets.load_dataset(name[3:], hub_config or None, token=os.environ.get("HF_TOKEN"))
    except Exception as exc:  # the hub client raises many types; the user needs the name and the reason
        raise BerthError(f"data.dataset={name}: cannot load from the hub: {exc}") from None
    return dict(found)


def _load_file(path: Path, key: str) -> datasets.Dataset:
    if not path.is_file():
        raise BerthError(f"{key}={path}: no such file")
    fmt = detect_format(path, "auto")
    if fmt not in BUILDERS:
        raise BerthError(f"{path}: labelled data must be JSON lines, CSV, TSV or Parquet; got {fmt}")
    if fmt in ("csv", "tsv", "jsonl"):
        check_utf8(path)
    kwargs = {"delimiter": "\t"} if fmt == "tsv" else {}
    try:
        return datasets.load_dataset(BUILDERS[fmt], data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # the builders raise many types; the user needs the file and the reason
        raise BerthError(f"{path}: cannot read as {fmt}: {exc}") from None


def require_columns(split: Split, columns: Sequence[str]) -> None:
    for column in columns:
        if column not in split.rows.column_names:
            raise BerthError(
                f"{split.where}: no column '{column}' (columns: {', '.join(split.rows.column_names)}); "
                "set data.text_column / data.label_column / data.tokens_column / data.tags_column"
            )


def _names_of(feature: datasets.features.FeatureType) -> list[str] | None:
    """The label names a ClassLabel feature (or a sequence of them) carries."""
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    inner = getattr(feature, "feature", None)
    if isinstance(feature, list) and feature:
        inner = feature[0]
    return _names_of(inner) if inner is not None else None


def label_values(split: Split, column: str) -> list:
    """The column's labels as strings (ClassLabel ids become their names); lists stay lists (NER tags)."""
    names = _names_of(split.rows.features[column])

    def name(value) -> str:
        # None, and a ClassLabel id of -1 (how hub datasets mark an unlabelled row), are missing labels
        if value is None or (names is not None and isinstance(value, int) and value < 0):
            return ""
        return names[value] if names is not None and isinstance(value, int) else str(value)

    return [[name(v) for v in row] if isinstance(row, list) else name(row) for row in split.rows[column]]


def resolve_labels(data: TaskData, train: Split, column: str) -> tuple[str, ...]:
    """Label names in id order: the config's, else the dataset's ClassLabel names, else the sorted training labels."""
    if data.label_names:
        return data.label_names
    names = _names_of(train.rows.features[column])
    if names is not None:
        return tuple(names)
    seen = set()
    for value in label_values(train, column):
        seen.update(value if isinstance(value, list) else [value])
    return tuple(sorted(seen - {""}, key=_label_sort_key))


def _label_sort_key(label: str) -> tuple:
    # Numbers in numeric order (2 before 10); BIO tags with O first, then by type, B before I.
    if label.lstrip("-").isdigit():
        return (0, int(label), "")
    if label == "O":
        return (1, "", "")
    if len(label) > 2 and label[1] == "-" and label[0] in "BIES":
        return (2, label[2:], label[0])
    return (3, label, "")


def check_labels(split: Split, values: list, known: Sequence[str], column: str, training_labels: bool) -> None:
    """Every label of the split is a known one; the first that is not stops the run, naming its row."""
    allowed = set(known)
    if values and all(v == "" or (isinstance(v, list) and set(v) <= {""}) for v in values):
        raise BerthError(
            f"{split.where}: no labels in column '{column}' (all missing or -1: an unlabelled split, as hub datasets "
            "mark their test splits); fine-tuning evaluates on labelled splits only: label it, or leave it out"
        )
    for row, value in enumerate(values):
        for label in value if isinstance(value, list) else [value]:
            if label == "":
                raise BerthError(f"{split.where} row {row}: missing label in column '{column}'")
            if label not in allowed:
                origin = "data.label_names" if not training_labels else "training"
                raise BerthError(
                    f"{split.where} row {row}: label '{label}' never seen in {origin} (labels: {', '.join(known)})"
                )


def check_texts(split: Split, column: str) -> list[str]:
    texts = list(split.rows[column])
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise BerthError(f"{split.where} row {row}: empty text in column '{column}'")
    return texts


def check_tokens(split: Split, column: str, tags: list[list[str]]) -> list[list[str]]:
    tokens = [list(row) for row in split.rows[column]]
    for row, (words, labels) in enumerate(zip(tokens, tags, strict=True)):
        if not words:
            raise BerthError(f"{split.where} row {row}: empty token list in column '{column}'")
        if len(words) != len(labels):
            raise BerthError(f"{split.where} row {row}: {len(words)} tokens but {len(labels)} tags")
    return tokens
