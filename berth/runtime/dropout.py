"""A faster dropout for CPU training, shared by the pretraining and fine-tuning loops."""

from __future__ import annotations

import torch
from torch import nn


class FastDropout(nn.Module):
    """Dropout whose mask comes from torch.rand: the same distribution as nn.Dropout, about twice as fast on CPU.

    PyTorch's CPU dropout draws its mask with bernoulli_, and BERT's dropouts run on every hidden state of
    every layer. Only the module differs: the weights, the saved checkpoints and the exported model are unchanged.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every nn.Dropout in `model` for FastDropout (CPU training). Returns how many were swapped.

    BERT's attention modules keep theirs in name only: sdpa reads `.p` and drops out inside its kernel.
    """
    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p))
                swapped += 1
    return swapped
