"""The task kinds berth fine-tunes, in one table: the config's `task` value and an export's architecture are looked
up here, and what differs between the kinds (the task class, the Auto class of its export, its pipeline, how
`berth predict` loads and runs it) is read from the entry. A new kind is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, PreTrainedModel

from berth.finetune.classification import ClassificationTask, predict_labels, predict_model
from berth.finetune.ner import NerTask, predict_entities
from berth.finetune.task import Loaded
from berth.finetune.windows import WindowSettings

# (the loaded export, texts, second texts or None, batch size) -> one JSON row a text
PredictFn = Callable[[Loaded, list[str], list[str] | None, int], list[dict[str, Any]]]


@dataclass(frozen=True)
class TaskKind:
    name: str  # the config's `task` value, and WindowSettings.task in an export
    task: type[ClassificationTask] | type[NerTask]  # implements berth.finetune.task.Task
    auto_class: Any  # the transformers Auto class that loads its export
    architecture: str  # how its exports' config.json names the head (in `architectures`)
    pipeline_tag: str  # the transformers pipeline (and hub tag) of its exports
    card_metrics: tuple[str, ...]  # the model card's metric names
    predict_model: Callable[[PreTrainedModel, Path, WindowSettings], torch.nn.Module]  # the loaded export to run
    predict: PredictFn


def _plain(model: PreTrainedModel, path: Path, settings: WindowSettings) -> torch.nn.Module:
    return model


KINDS = {
    kind.name: kind
    for kind in (
        TaskKind(
            "classification",
            ClassificationTask,
            AutoModelForSequenceClassification,
            "ForSequenceClassification",
            "text-classification",
            ("accuracy", "f1"),
            predict_model,
            predict_labels,
        ),
        TaskKind(
            "ner",
            NerTask,
            AutoModelForTokenClassification,
            "ForTokenClassification",
            "token-classification",
            ("f1", "precision", "recall"),
            _plain,
            predict_entities,
        ),
    )
}


def task_kind(name: str) -> TaskKind:
    if name not in KINDS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]


def kind_of_architectures(architectures: Sequence[str]) -> TaskKind | None:
    """The kind whose head a checkpoint's `architectures` names, or None (not a fine-tuned classifier)."""
    for kind in KINDS.values():
        if any(name.endswith(kind.architecture) for name in architectures):
            return kind
    return None
