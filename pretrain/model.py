"""The encoders berth pretrains (transformers' BERT and ModernBERT) and the objective with a masked-only MLM head."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    BertConfig,
    ModernBertConfig,
    ModernBertForMaskedLM,
)

from berth.core.errors import BerthError
from berth.core.hub import hub_model_id
from berth.core.labels import IGNORE_INDEX
from berth.core.models import HFModel
from berth.pretrain.config import MODEL_SIZES, ModelConfig
from berth.pretrain.document_mask import document_block_mask

logger = logging.getLogger(__name__)

# Logit bias of the padding rows of the vocabulary: never predicted, also not by a fill-mask pipeline.
NEVER = -1e4
# berth's [CLS]-task head for encoders that ship none (ModernBERT), saved beside model.safetensors.
SENTENCE_HEAD = "sentence_head.safetensors"


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


def modernbert_config(cfg: ModelConfig, vocab_size: int, special: dict[str, int]) -> ModernBertConfig:
    """ModernBERT (RoPE, GeGLU, pre-LN) at a miniature size: GeGLU width 1.5 H as ModernBERT-base, global
    attention in every layer (sequences here are shorter than its local window)."""
    layers, hidden = MODEL_SIZES[cfg.size]
    return ModernBertConfig(
        vocab_size=padded_vocab_size(vocab_size, cfg.pad_vocab_multiple),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=hidden * 3 // 2,
        max_position_embeddings=cfg.max_position_embeddings,
        global_attn_every_n_layers=1,  # type: ignore[call-arg]  # taken by **kwargs, made into layer_types
        embedding_dropout=cfg.hidden_dropout,
        mlp_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        pad_token_id=special["pad"],
        cls_token_id=special["cls"],
        sep_token_id=special["sep"],
        bos_token_id=special["cls"],
        eos_token_id=special["sep"],
        tie_word_embeddings=True,
    )


def resolve_attention(cfg: ModelConfig, device_type: str) -> str:
    """The attention implementation for model.attn_implementation=auto.

    On CPU, PyTorch 2.13's sdpa backward (its flash-attention kernel for CPU) takes 30% of a mini-model training
    step, and eager attention's plain matmuls make the step 1.15x (BERT) to 1.27x (ModernBERT) faster in bf16
    (bench/attention_bench.py). Eager attention draws its dropout mask with the slow bernoulli_, though, so
    with attention dropout sdpa stays. GPUs keep sdpa (fused kernels).
    """
    if cfg.attn_implementation == "flex_attention" and device_type != "cuda":
        raise BerthError(
            f"model.attn_implementation=flex_attention needs a CUDA device (torch's FlexAttention has no backward on "
            f"{device_type}); use auto"
        )
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "eager" if device_type == "cpu" and cfg.attention_dropout == 0 else "sdpa"


def build_model(
    cfg: ModelConfig, vocab_size: int, pad_token_id: int, cls_id: int = 2, sep_id: int = 3, device_type: str = "cpu"
) -> HFModel:
    """A fresh encoder of `cfg.size` (BertForPreTraining, or ModernBertForMaskedLM for architecture=modernbert),
    or the checkpoint `cfg.init` for continued pretraining, to be trained on `device_type`."""
    attention = resolve_attention(cfg, device_type)
    if cfg.init:
        model = load_checkpoint_model(cfg.init, attention)
        if model.config.vocab_size < vocab_size:
            raise BerthError(
                f"model.init={cfg.init}: its vocabulary has {model.config.vocab_size} entries, fewer than "
                f"the tokenizer's {vocab_size}; use the checkpoint's own tokenizer (tokenizer.path)"
            )
    elif cfg.architecture == "modernbert":
        special = {"pad": pad_token_id, "cls": cls_id, "sep": sep_id}
        model = ModernBertForMaskedLM._from_config(
            modernbert_config(cfg, vocab_size, special), attn_implementation=attention
        )
    else:
        model = AutoModelForPreTraining.from_config(
            bert_config(cfg, vocab_size, pad_token_id), attn_implementation=attention
        )
    with torch.no_grad():
        output_bias(model)[vocab_size:] = NEVER
    return model


def output_bias(model: HFModel) -> torch.Tensor:
    """The MLM output layer's bias, one entry per vocabulary row."""
    return model.decoder.bias if is_modernbert(model) else model.cls.predictions.bias


def is_modernbert(model: HFModel) -> bool:
    return model.config.model_type == "modernbert"


def load_checkpoint_model(path_or_id: str, attn_implementation: str) -> HFModel:
    if Path(path_or_id).exists() and not (Path(path_or_id) / "config.json").is_file():
        raise BerthError(f"model.init={path_or_id}: not a model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except OSError as exc:
        raise BerthError(f"model.init={path_or_id}: cannot load: {str(exc).splitlines()[0]}") from None
    if config.model_type == "modernbert":
        return AutoModelForMaskedLM.from_pretrained(path_or_id, attn_implementation=attn_implementation)
    if config.model_type != "bert":
        raise BerthError(
            f"model.init={path_or_id}: a {config.model_type} checkpoint; berth pretrains BERT and ModernBERT"
        )
    # A checkpoint without pretraining heads (a sentence encoder, say) gets fresh ones; the encoder is kept.
    return AutoModelForPreTraining.from_pretrained(path_or_id, attn_implementation=attn_implementation)


class SentenceHead(nn.Module):
    """The [CLS]-task (NSP / SOP) head for encoders that ship none: BERT's pooler (dense + tanh) and a
    two-way classifier on the final [CLS] vector. Saved as sentence_head.safetensors beside the model, so
    continued pretraining picks it up; AutoModel* loaders ignore the file."""

    def __init__(self, hidden_size: int, initializer_range: float = 0.02):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, 2)
        for layer in (self.dense, self.classifier):
            nn.init.normal_(layer.weight, std=initializer_range)
            nn.init.zeros_(layer.bias)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, 2)
        return self.classifier(torch.tanh(self.dense(cls)))


def load_sentence_head(head: SentenceHead, init: str) -> bool:
    """Continue from the head saved with checkpoint `init` (a directory or hub id), when it has one.
    Returns whether it did; a checkpoint without one (not pretrained by berth) leaves the head fresh."""
    if not init:
        return False
    path = Path(init) / SENTENCE_HEAD
    if not path.is_file() and not Path(init).exists() and hub_model_id(init):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(hf_hub_download(init, SENTENCE_HEAD))
        except EntryNotFoundError:
            logger.info("%s has no %s: the [CLS]-task head starts fresh", init, SENTENCE_HEAD)
            return False
    if not path.is_file():
        return False
    head.load_state_dict(load_file(path))
    return True


class PretrainingObjective(nn.Module):
    """Masked-LM (+ NSP/SOP) sums for one batch, running the MLM head on the masked positions only.

    Gathering the N masked positions before the prediction head turns its (B * L, H) x (H, V) matmul into
    (N, H) x (H, V), about 15% of the work. Returns sums and counts, not means, so the caller can normalise
    by the count over all processes and accumulation steps (exact equivalence across process counts).
    """

    model: HFModel

    def __init__(self, model: HFModel, vocab_size: int, sentence_task: bool):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.sentence_task = sentence_task
        # BERT carries its own NSP head (cls.seq_relationship); ModernBERT ships none, so berth adds one.
        self.sentence_head = SentenceHead(model.config.hidden_size) if sentence_task and is_modernbert(model) else None

    @property
    def flex(self) -> bool:
        """Packed rows get a FlexAttention block mask rather than a dense (R, 1, L, L) one."""
        return self.model.config._attn_implementation == "flex_attention"

    def forward(
        self,
        input_ids: torch.Tensor,  # (R, L)
        token_type_ids: torch.Tensor,  # (R, L)
        attention_mask: torch.Tensor,  # (R, L)
        mlm_positions: torch.Tensor,  # (N,) flat indices into R * L
        mlm_labels: torch.Tensor,  # (N,)
        next_sentence_label: torch.Tensor,  # (B,), -100 where there is no [CLS] task
        position_ids: torch.Tensor | None = None,  # (R, L), packed batches only
        sequence_ids: torch.Tensor | None = None,  # (R, L) example of each token, -1 padding; packed only
        cls_positions: torch.Tensor | None = None,  # (B,) flat indices of each example's [CLS]; packed only
    ) -> dict[str, torch.Tensor]:
        if is_modernbert(self.model):
            sequence = self.model.model(
                input_ids=input_ids,
                attention_mask=self.modernbert_mask(attention_mask, sequence_ids),
                position_ids=position_ids,
            )[0]  # (R, L, H); ModernBERT has no token types
            hidden = sequence.flatten(0, 1).index_select(0, mlm_positions)  # (N, H)
            logits = self.vocab_logits(self.model.head(hidden), self.model.decoder)  # (N, V)
            out = self.mlm_outputs(logits, mlm_labels)
            if self.sentence_head is not None:
                cls = sequence[:, 0] if cls_positions is None else sequence.flatten(0, 1).index_select(0, cls_positions)
                out.update(self.sentence_outputs(self.sentence_head(cls), next_sentence_label))  # cls: (B, H)
            return out
        mask: torch.Tensor | BlockMask = attention_mask
        if sequence_ids is not None:
            mask = document_block_mask(sequence_ids) if self.flex else self.block_diagonal_mask(sequence_ids)
        sequence, pooled = self.model.bert(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            attention_mask=mask,
            position_ids=position_ids,
            return_dict=False,
        )[:2]  # (R, L, H), (R, H)
        hidden = sequence.flatten(0, 1).index_select(0, mlm_positions)  # (N, H)
        predictions = self.model.cls.predictions
        logits = self.vocab_logits(predictions.transform(hidden), predictions.decoder)  # (N, V)
        out = self.mlm_outputs(logits, mlm_labels)
        if self.sentence_task:
            if cls_positions is not None:  # packed: the pooler on every example's [CLS], not only row starts
                pooler = self.model.bert.pooler
                pooled = pooler.activation(pooler.dense(sequence.flatten(0, 1).index_select(0, cls_positions)))
            out.update(self.sentence_outputs(self.model.cls.seq_relationship(pooled), next_sentence_label))
        return out

    def external_parameters(self) -> list[tuple[nn.Module, list[nn.Parameter]]]:
        """Weights read outside their own module's forward (the output matrix, cut in `vocab_logits`), with the
        module whose forward uses them: ZeRO-3 must gather them there."""
        decoder = self.model.decoder if is_modernbert(self.model) else self.model.cls.predictions.decoder
        return [(self, [p for p in (decoder.weight, decoder.bias) if p is not None])]

    def vocab_logits(self, hidden: torch.Tensor, decoder: nn.Linear) -> torch.Tensor:
        """(N, H) -> (N, V) fp32 logits over the real vocabulary: the padding rows of the tied output matrix
        are left out of the matmul, never predicted and given no gradient. Cutting the weight rather than the
        logits keeps the logits contiguous; log-softmax on a strided slice was a tenth of a CPU step."""
        return F.linear(hidden, decoder.weight[: self.vocab_size], decoder.bias[: self.vocab_size]).float()

    @staticmethod
    def sentence_outputs(
        logits: torch.Tensor,  # (B, 2)
        labels: torch.Tensor,  # (B,), -100 where there is no [CLS] task
    ) -> dict[str, torch.Tensor]:
        logits, valid = logits.float(), labels >= 0
        return {
            "nsp_loss": F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"),
            "nsp_correct": ((logits.argmax(-1) == labels) & valid).sum(),
            "nsp_count": valid.sum(),
        }

    def modernbert_mask(
        self, attention_mask: torch.Tensor, sequence_ids: torch.Tensor | None
    ) -> torch.Tensor | dict[str, torch.Tensor | BlockMask]:
        """The padding mask for unpacked rows; for packed rows, the block-diagonal mask of each layer type
        (sliding-window layers also keep to their band), which ModernBERT takes as a mapping: dense, or a
        FlexAttention block mask under flex_attention."""
        if sequence_ids is None:
            return attention_mask
        masks: dict[str, torch.Tensor | BlockMask] = {}
        if self.flex:
            masks["full_attention"] = document_block_mask(sequence_ids)
            if "sliding_attention" in self.model.config.layer_types:
                masks["sliding_attention"] = document_block_mask(sequence_ids, self.model.config.sliding_window)
            return masks
        allowed = self.block_diagonal_mask(sequence_ids, boolean=True)  # (R, 1, L, L)
        masks["full_attention"] = self.additive(allowed)
        if "sliding_attention" in self.model.config.layer_types:
            index = torch.arange(sequence_ids.shape[1], device=sequence_ids.device)
            band = (index[:, None] - index[None, :]).abs() <= self.model.config.sliding_window  # (L, L)
            masks["sliding_attention"] = self.additive(allowed & band)
        return masks

    @staticmethod
    def mlm_outputs(logits: torch.Tensor, mlm_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "mlm_loss": F.cross_entropy(logits, mlm_labels, reduction="sum"),
            "mlm_correct": (logits.argmax(-1) == mlm_labels).sum(),
            "mlm_count": torch.tensor(mlm_labels.numel(), device=logits.device),
        }

    def block_diagonal_mask(self, sequence_ids: torch.Tensor, boolean: bool = False) -> torch.Tensor:
        """(R, L) example ids -> (R, 1, L, L) mask: a token attends to the tokens of its own example only.

        Padding attends to itself alone, so that no softmax row is empty (an empty row is NaN, and NaN
        times a zero attention weight still spreads).
        """
        same = sequence_ids[:, :, None] == sequence_ids[:, None, :]  # (R, L, L)
        real = (sequence_ids >= 0)[:, :, None]
        eye = torch.eye(sequence_ids.shape[1], dtype=torch.bool, device=sequence_ids.device)
        allowed = ((same & real) | eye)[:, None]  # (R, 1, L, L)
        return allowed if boolean else self.additive(allowed)

    def additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """sdpa takes the boolean mask; eager attention adds the mask to its scores."""
        if self.model.config._attn_implementation == "sdpa":
            return allowed
        blocked = torch.finfo(self.model.dtype).min
        return torch.zeros(allowed.shape, dtype=self.model.dtype, device=allowed.device).masked_fill(~allowed, blocked)
