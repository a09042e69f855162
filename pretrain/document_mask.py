"""Document-masked attention for packed rows as a FlexAttention block mask, built from the rows' example ids.

A packed row holds several examples, each of which must see only itself. The dense path hands the encoder an
(R, 1, L, L) mask, so attention computes every cross-example score and then masks it, and SDPA cannot take its
FlashAttention kernel. A FlexAttention `BlockMask` names the (128 x 128) blocks that hold any allowed pair, so
the kernel skips the others and masks within the rest by `document_mask_mod`: the same rule as the dense mask
(`berth.pretrain.backbone.block_diagonal_mask`), which `tests/test_pretrain_model.py` checks pair for pair.

FlexAttention trains on CUDA only (torch 2.13 has no FlexAttention backward on CPU), and transformers' FlexAttention
path takes no attention dropout; `model.attn_implementation=flex_attention` is refused elsewhere in one line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def document_mask_mod(sequence_ids: torch.Tensor, window: int | None = None) -> MaskMod:
    """(row, head, query, key) -> allowed, for rows of example ids (R, L) (-1: padding): a token sees the tokens
    of its own example, padding sees itself alone (no empty softmax row), and with `window` only keys at most
    that far away (ModernBERT's sliding-window layers)."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        own = (sequence_ids[b, q] == sequence_ids[b, kv]) & (sequence_ids[b, q] >= 0)
        allowed = own | (q == kv)
        if window is not None:
            allowed = allowed & ((q - kv).abs() <= window)
        return allowed

    return mask_mod


def document_block_mask(sequence_ids: torch.Tensor, window: int | None = None) -> BlockMask:
    """The block mask of `document_mask_mod` for rows (R, L), one for all heads, on the rows' device."""
    rows, length = sequence_ids.shape
    return create_block_mask(
        document_mask_mod(sequence_ids, window), rows, None, length, length, device=sequence_ids.device
    )
