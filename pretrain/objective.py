"""What pretraining needs of an objective (`data.objective`): masked LM (`berth.pretrain.model`) or replaced-token
detection (`berth.pretrain.rtd`). The stage builds one, trains it as the loop's module and exports what it
names; nothing outside an objective reaches into its parts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

# Sums a forward returns, by task: loss, correct, count. Counts are what a figure is divided by.
TASKS = ("mlm", "nsp", "rtd")


@dataclass
class Export:
    """One Hugging Face model folder of an export: `folder` under final/ ("" for final/ itself)."""

    folder: str
    model: PreTrainedModel  # the class and config that save_pretrained writes
    weights: dict[str, torch.Tensor]  # its state dict, from the gathered whole weights
    pipeline_tag: str  # for the model card
    role: str  # one line for the model card: what this model is
    # Files of berth's own heads written beside model.safetensors: name -> state dict.
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class Objective(nn.Module):
    """A module whose forward takes a collated batch's model inputs and returns sums, not means: each figure
    of `figure_names` (task_loss, task_correct, task_count, ...), so the loop can normalise by the counts over
    every process and micro-batch. The methods below are the whole of what the stage uses."""

    figure_names: tuple[str, ...]

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[T] how many targets each loss term has (the loop divides each term by its global count)."""
        raise NotImplementedError

    def loss_terms(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """[T] the loss sums of one forward, weighted, in the order of `targets`."""
        raise NotImplementedError

    def external_parameters(self) -> list[tuple[nn.Module, list[nn.Parameter]]]:
        """Weights read outside their own module's forward, with the module whose forward reads them."""
        raise NotImplementedError

    def exports(self, weights: dict[str, torch.Tensor]) -> list[Export]:
        """The folders to write from the whole weights of this module (keys as in its state dict)."""
        raise NotImplementedError

    def flops_per_token(self, seq_len: int, mask_prob: float) -> float:
        """Training FLOPs per token, for MFU."""
        raise NotImplementedError

    def load_heads(self, init: str) -> None:
        """Continue berth's own heads from checkpoint `init` (empty: none) where it has them."""
        raise NotImplementedError


def figure_fields(sums: dict[str, float]) -> dict[str, float]:
    """Per-target figures from summed ones: mlm_loss and mlm_accuracy, nsp_*, rtd_*; rtd_recall is the share of
    replaced tokens the discriminator finds, rtd_replaced the share of tokens the generator replaced."""
    fields: dict[str, float] = {}
    for task in TASKS:
        if f"{task}_count" not in sums:
            continue
        count = max(sums[f"{task}_count"], 1.0)
        fields[f"{task}_loss"] = sums[f"{task}_loss"] / count
        fields[f"{task}_accuracy"] = sums[f"{task}_correct"] / count
    if "rtd_replaced" in sums:
        fields["rtd_recall"] = sums["rtd_found"] / max(sums["rtd_replaced"], 1.0)
        fields["rtd_replaced"] = sums["rtd_replaced"] / max(sums["rtd_count"], 1.0)
    return fields


def evaluation_fields(sums: dict[str, float]) -> dict[str, float]:
    """`figure_fields` and the masked-LM perplexity, for held-out evaluation."""
    fields = figure_fields(sums)
    fields["perplexity"] = math.exp(min(fields["mlm_loss"], 50.0))
    return fields
