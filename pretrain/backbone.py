"""Running an encoder body (transformers' BertModel, ElectraModel or ModernBertModel) on plain or packed rows.

A packed row holds several examples, each of which must attend to itself only: the body gets a block-diagonal
mask built from the rows' example ids (dense, or a FlexAttention block mask under flex_attention), and its
positions restart per example. Masked LM and replaced-token detection run their bodies through `encode`.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from berth.core.models import HFModel
from berth.pretrain.document_mask import document_block_mask
from berth.pretrain.unpadded import NAME as UNPADDED
from berth.pretrain.unpadded import rows_as_examples, unpad


def is_flex(config: HFModel) -> bool:
    return config._attn_implementation == "flex_attention"


def encode(
    body: HFModel,
    input_ids: torch.Tensor,  # (R, L)
    token_type_ids: torch.Tensor,  # (R, L)
    attention_mask: torch.Tensor,  # (R, L)
    position_ids: torch.Tensor | None = None,  # (R, L), packed rows only
    sequence_ids: torch.Tensor | None = None,  # (R, L) example of each token, -1 padding; packed rows only
) -> torch.Tensor:
    """(R, L, H): the final hidden states of `body`. ModernBERT has no token types."""
    if body.config._attn_implementation == UNPADDED:
        return encode_unpadded(body, input_ids, token_type_ids, attention_mask, sequence_ids)
    if body.config.model_type == "modernbert":
        mask = modernbert_mask(body, attention_mask, sequence_ids)
        return body(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)[0]
    return body(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        attention_mask=bert_mask(body, attention_mask, sequence_ids),
        position_ids=position_ids,
        return_dict=False,
    )[0]


def encode_unpadded(
    body: HFModel,
    input_ids: torch.Tensor,  # (R, L)
    token_type_ids: torch.Tensor,  # (R, L)
    attention_mask: torch.Tensor,  # (R, L)
    sequence_ids: torch.Tensor | None,  # (R, L), packed rows only
) -> torch.Tensor:
    """(R, L, H) from one row of the real tokens (berth.pretrain.unpadded); padding slots hold zeros."""
    where = unpad(rows_as_examples(attention_mask) if sequence_ids is None else sequence_ids)
    inputs = {"input_ids": input_ids.flatten()[where.tokens][None], "position_ids": where.positions[None]}  # (1, T)
    if body.config.model_type != "modernbert":
        inputs["token_type_ids"] = token_type_ids.flatten()[where.tokens][None]
    # The rows' mask is 4-D, so transformers passes it to `attend` as it is.
    hidden = body(**inputs, attention_mask=where.allowed, unpadded=where)[0][0]  # (T, H)
    rows, length = input_ids.shape
    out = hidden.new_zeros(rows * length, hidden.shape[-1])
    out[where.tokens] = hidden
    return out.view(rows, length, -1)


def bert_mask(
    body: HFModel, attention_mask: torch.Tensor, sequence_ids: torch.Tensor | None
) -> torch.Tensor | BlockMask:
    """The padding mask for plain rows; for packed rows the block-diagonal one (BERT and ELECTRA)."""
    if sequence_ids is None:
        return attention_mask
    return document_block_mask(sequence_ids) if is_flex(body.config) else block_diagonal_mask(body, sequence_ids)


def modernbert_mask(
    body: HFModel, attention_mask: torch.Tensor, sequence_ids: torch.Tensor | None
) -> torch.Tensor | dict[str, torch.Tensor | BlockMask]:
    """The padding mask for plain rows; for packed rows, the block-diagonal mask of each layer type
    (sliding-window layers also keep to their band), which ModernBERT takes as a mapping: dense, or a
    FlexAttention block mask under flex_attention."""
    if sequence_ids is None:
        return attention_mask
    config = body.config
    masks: dict[str, torch.Tensor | BlockMask] = {}
    if is_flex(config):
        masks["full_attention"] = document_block_mask(sequence_ids)
        if "sliding_attention" in config.layer_types:
            masks["sliding_attention"] = document_block_mask(sequence_ids, config.sliding_window)
        return masks
    allowed = block_diagonal_mask(body, sequence_ids, boolean=True)  # (R, 1, L, L)
    masks["full_attention"] = additive(body, allowed)
    if "sliding_attention" in config.layer_types:
        index = torch.arange(sequence_ids.shape[1], device=sequence_ids.device)
        band = (index[:, None] - index[None, :]).abs() <= config.sliding_window  # (L, L)
        masks["sliding_attention"] = additive(body, allowed & band)
    return masks


def block_diagonal_mask(body: HFModel, sequence_ids: torch.Tensor, boolean: bool = False) -> torch.Tensor:
    """(R, L) example ids -> (R, 1, L, L) mask: a token attends to the tokens of its own example only.

    Padding attends to itself alone, so that no softmax row is empty (an empty row is NaN, and NaN
    times a zero attention weight still spreads).
    """
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]  # (R, L, L)
    real = (sequence_ids >= 0)[:, :, None]
    eye = torch.eye(sequence_ids.shape[1], dtype=torch.bool, device=sequence_ids.device)
    allowed = ((same & real) | eye)[:, None]  # (R, 1, L, L)
    return allowed if boolean else additive(body, allowed)


def additive(body: HFModel, allowed: torch.Tensor) -> torch.Tensor:
    """sdpa takes the boolean mask; eager attention adds the mask to its scores."""
    if body.config._attn_implementation == "sdpa":
        return allowed
    blocked = torch.finfo(body.dtype).min
    return torch.zeros(allowed.shape, dtype=body.dtype, device=allowed.device).masked_fill(~allowed, blocked)
