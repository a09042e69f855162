"""The protocol a fine-tuning task implements; `FinetuneStage` (finetune.train) drives it in the shared loop.

Two tasks ship: `ClassificationTask` (one label per text or text pair, long texts in windows) and `NerTask`
(BIO tags per word). A new task is a class with these members, added to `berth.finetune.registry.KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from berth.finetune.windows import WindowSettings

Batch = dict[str, torch.Tensor]


class Task(Protocol):
    kind: str  # the config's `task` value
    metrics: tuple[str, ...]  # the validation figures train.metric may name
    labels: tuple[str, ...]
    splits: dict[str, Any]  # the encoded splits by name: train, validation, test (optional)
    # Methods of its model besides forward that use the weights (a sharding engine gathers them there too).
    forward_methods: tuple[str, ...]

    def build_model(self, init: str, config: PretrainedConfig, from_scratch: bool) -> Any:
        """The model to fine-tune, with a head for this task's labels."""

    def export_settings(self, aggregation: str) -> WindowSettings:
        """How predict must cut and combine texts, given the aggregation validation chose."""

    def fingerprint(self) -> str:
        """A hash of the encoded splits (token ids and labels): changed data under the same file names shows."""

    def train_units(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """The training units of an epoch (window indices each) and their lengths, for length grouping."""

    def collate(self, units: list[list[int]], split: str = "train") -> Batch: ...

    def targets(self, batch: Batch) -> torch.Tensor:
        """How many prediction targets the batch holds (a scalar)."""

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        """The summed loss over the batch's targets (the loop divides by the total over every process)."""

    def evaluate(
        self, model: Any, split: str, acc: Any, batch_size: int, aggregation: str | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Figures on a split and one prediction row per text."""

    def test_extras(self, model: Any, acc: Any, batch_size: int) -> dict[str, Any]:
        """Further results for eval_results.json beside the test figures (may be empty)."""


@dataclass(frozen=True)
class Loaded:
    """A fine-tuned export ready to label texts (`berth predict`): what a task kind's predict function reads."""

    model: torch.nn.Module  # on acc.device, dropout off
    tokenizer: PreTrainedTokenizerBase
    settings: WindowSettings  # how it was trained to cut and combine texts
    labels: list[str]
    acc: Any  # an Accelerator: the device, and one process
