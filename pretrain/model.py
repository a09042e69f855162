"""transformers' own BERT (BertForPreTraining) and the pretraining objective with a masked-only MLM head."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForPreTraining, BertConfig, BertForPreTraining

from berth.errors import BerthError
from pretrain.config import MODEL_SIZES, ModelConfig

# Logit bias of the padding rows of the vocabulary: never predicted, also not by a fill-mask pipeline.
NEVER = -1e4


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def bert_config(cfg: ModelConfig, vocab_size: int, pad_token_id: int) -> BertConfig:
    layers, hidden = MODEL_SIZES[cfg.size]
    return BertConfig(
        vocab_size=padded_vocab_size(vocab_size, cfg.pad_vocab_multiple),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=2,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
    )


def build_model(cfg: ModelConfig, vocab_size: int, pad_token_id: int) -> BertForPreTraining:
    """A fresh BERT of `cfg.size`, or the checkpoint `cfg.init` for continued pretraining."""
    if cfg.init:
        model = load_checkpoint_model(cfg.init, cfg.attn_implementation)
        if model.config.vocab_size < vocab_size:
            raise BerthError(
                f"model.init={cfg.init}: its vocabulary has {model.config.vocab_size} entries, fewer than "
                f"the tokenizer's {vocab_size}; use the checkpoint's own tokenizer (tokenizer.path)"
            )
    else:
        model = AutoModelForPreTraining.from_config(
            bert_config(cfg, vocab_size, pad_token_id), attn_implementation=cfg.attn_implementation
        )
    with torch.no_grad():
        model.cls.predictions.bias[vocab_size:] = NEVER
    return model


def load_checkpoint_model(path_or_id: str, attn_implementation: str) -> BertForPreTraining:
    if Path(path_or_id).exists() and not (Path(path_or_id) / "config.json").is_file():
        raise BerthError(f"model.init={path_or_id}: not a model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except OSError as exc:
        raise BerthError(f"model.init={path_or_id}: cannot load: {str(exc).splitlines()[0]}") from None
    if config.model_type != "bert":
        raise BerthError(f"model.init={path_or_id}: a {config.model_type} checkpoint; berth pretrains BERT")
    # A checkpoint without pretraining heads (a sentence encoder, say) gets fresh ones; the encoder is kept.
    return AutoModelForPreTraining.from_pretrained(path_or_id, attn_implementation=attn_implementation)


class PretrainingObjective(nn.Module):
    """Masked-LM (+ NSP/SOP) sums for one batch, running the MLM head on the masked positions only.

    Gathering the N masked positions before the prediction head turns its (B * L, H) x (H, V) matmul into
    (N, H) x (H, V), about 15% of the work. Returns sums and counts, not means, so the caller can normalise
    by the count over all processes and accumulation steps (exact equivalence across process counts).
    """

    def __init__(self, model: BertForPreTraining, vocab_size: int, sentence_task: bool):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.sentence_task = sentence_task

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        token_type_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor,  # (B, L)
        mlm_positions: torch.Tensor,  # (N,) flat indices into B * L
        mlm_labels: torch.Tensor,  # (N,)
        next_sentence_label: torch.Tensor,  # (B,), -100 where there is no [CLS] task
    ) -> dict[str, torch.Tensor]:
        sequence, pooled = self.model.bert(
            input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask, return_dict=False
        )[:2]  # (B, L, H), (B, H)
        hidden = sequence.flatten(0, 1).index_select(0, mlm_positions)  # (N, H)
        logits = self.model.cls.predictions(hidden)[:, : self.vocab_size].float()  # (N, V): padding rows cut
        out = {
            "mlm_loss": F.cross_entropy(logits, mlm_labels, reduction="sum"),
            "mlm_correct": (logits.argmax(-1) == mlm_labels).sum(),
            "mlm_count": torch.tensor(mlm_labels.numel(), device=logits.device),
        }
        if self.sentence_task:
            nsp_logits = self.model.cls.seq_relationship(pooled).float()  # (B, 2)
            valid = next_sentence_label >= 0
            out["nsp_loss"] = F.cross_entropy(nsp_logits, next_sentence_label, ignore_index=-100, reduction="sum")
            out["nsp_correct"] = ((nsp_logits.argmax(-1) == next_sentence_label) & valid).sum()
            out["nsp_count"] = valid.sum()
        return out
