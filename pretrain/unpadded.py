"""Packed rows run unpadded: every linear layer sees the real tokens only, and attention each example alone.

Packing leaves padding at the end of rows (`packing_efficiency` in metrics.jsonl), which every matmul computes,
and the dense path's (R, 1, L, L) block-diagonal mask also computes every cross-example score and then masks it.
Here the body gets one row of the T real tokens (example after
example, as they lie in the packed rows), and transformers' attention interface calls `attend` with `Unpadded`,
which says where they lie. On CUDA in half precision without attention dropout, attention is torch's
variable-length FlashAttention over each example (`varlen_attn`); otherwise the queries, keys and values go back
into the packed rows for eager attention's plain matmuls under each row's block-diagonal mask (and ModernBERT's
band on its sliding layers), and the real tokens come out again.

`model.attn_implementation=unpadded` names it; auto does not pick it (berth.pretrain.model.resolve_attention). The
name is berth's, registered with transformers' attention and mask interfaces: a model built with it still answers
a direct call as eager attention would, and the name is not written into exported configs, so exports load with
transformers' own attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

NAME = "berth_unpadded"


@dataclass(frozen=True)
class Unpadded:
    """Where the real tokens of packed rows lie, and which of them may attend to which."""

    tokens: torch.Tensor  # (T,) flat indices into (R * L) of the real tokens, in row order
    positions: torch.Tensor  # (T,) each real token's position within its example
    allowed: torch.Tensor  # (R, 1, L, L) bool: query and key of one example (padding: itself only)
    starts: torch.Tensor  # (examples + 1,) int32: where each example starts among the real tokens, then T
    longest: int  # the longest example's length

    @property
    def rows(self) -> int:
        return self.allowed.shape[0]


def unpad(sequence_ids: torch.Tensor) -> Unpadded:
    """(R, L) example ids, -1 for padding -> the real tokens in row order, and the rows' block-diagonal mask.

    Each example's tokens are contiguous in its row (berth.pretrain.masking.pack_batch), so within a row the
    distance between two tokens of one example is their distance within it.
    """
    ids = sequence_ids.flatten()  # (R * L,)
    tokens = (ids >= 0).nonzero().squeeze(1)  # (T,)
    ids = ids[tokens]
    starts = torch.ones_like(ids, dtype=torch.bool)  # (T,) first token of an example
    starts[1:] = ids[1:] != ids[:-1]
    first = starts.nonzero().squeeze(1)  # (examples,) where each example starts among the real tokens
    positions = torch.arange(len(ids), device=ids.device) - first[starts.cumsum(0) - 1]  # (T,)
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]  # (R, L, L)
    # Padding keeps itself as its only key, so that no softmax row is empty; its output is never read.
    eye = torch.eye(sequence_ids.shape[1], dtype=torch.bool, device=ids.device)
    allowed = (same & (sequence_ids >= 0)[:, :, None]) | eye
    starts_t = torch.cat([first, first.new_tensor([len(ids)])]).to(torch.int32)  # (examples + 1,)
    longest = int(torch.diff(starts_t).max())
    return Unpadded(tokens, positions, allowed[:, None], starts_t, longest)


def rows_as_examples(attention_mask: torch.Tensor) -> torch.Tensor:
    """(R, L) padding mask of plain rows, one example each -> their example ids (R, L), -1 for padding."""
    rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)[:, None]
    return torch.where(attention_mask.bool(), rows, -1)


def attend(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, heads, T, head_dim) through encode; (B, heads, L, head_dim) called directly
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # bool: Unpadded.allowed through encode; transformers' own otherwise
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    unpadded: Unpadded | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: returns (1, T, heads, head_dim) (or (B, L, heads, head_dim))
    and no weights.

    A model built with this attention still answers a direct call, as eager attention would: transformers builds
    its boolean mask (sliding band included) and nothing is unpadded. Through encode the mask is the rows'
    block-diagonal one, passed as-is, so ModernBERT's band is added here: `sliding_window` is inclusive-exclusive,
    as flash attention takes it (a key at most sliding_window - 1 positions away).
    """
    if unpadded is None:
        return masked_attention(module, query, key, value, attention_mask, scaling, dropout), None
    if varlen_kernel(query, dropout):
        # FlashAttention over each example's own tokens: no padding and no cross-example score at all.
        window = (-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1)
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, h, d)
        s, m = unpadded.starts, unpadded.longest
        out = varlen_attn(q, k, v, s, s, m, m, scale=scaling, window_size=window)  # (T, h, d): no return_aux
        assert isinstance(out, torch.Tensor)
        return out.unsqueeze(0), None
    rows, length = unpadded.rows, unpadded.allowed.shape[-1]
    heads, width = query.shape[1], query.shape[-1]

    def in_rows(x: torch.Tensor) -> torch.Tensor:  # (1, heads, T, d) -> (R, heads, L, d)
        out = x.new_zeros(rows * length, heads, width)
        out[unpadded.tokens] = x[0].transpose(0, 1)
        return out.view(rows, length, heads, width).transpose(1, 2)

    allowed = unpadded.allowed  # what encode passed as attention_mask
    if sliding_window is not None:
        columns = torch.arange(length, device=query.device)
        allowed = allowed & ((columns[:, None] - columns[None, :]).abs() < sliding_window)  # band (L, L)
    out = masked_attention(module, in_rows(query), in_rows(key), in_rows(value), allowed, scaling, dropout)
    return out.reshape(rows * length, heads, width)[unpadded.tokens].unsqueeze(0), None  # (1, T, h, d)


def varlen_kernel(query: torch.Tensor, dropout: float) -> bool:
    """torch's variable-length FlashAttention takes it: CUDA, half precision, no attention dropout."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0


def masked_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, heads, L, d)
    key: torch.Tensor,  # (B, heads, L, d)
    value: torch.Tensor,  # (B, heads, L, d)
    allowed: torch.Tensor | None,  # (B, 1, L, L) bool, or None: every pair
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    """(B, L, heads, d): eager attention's plain matmuls, the softmax in fp32."""
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2)


AttentionInterface.register(NAME, attend)
AttentionMaskInterface.register(NAME, sdpa_mask)  # direct calls: transformers' boolean masks
