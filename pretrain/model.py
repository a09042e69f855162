"""The encoders berth pretrains (transformers' BERT and ModernBERT) and masked LM, with a masked-only MLM head."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
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
from berth.pretrain.backbone import encode
from berth.pretrain.config import MODEL_SIZES, ModelConfig
from berth.pretrain.objective import Export, Objective
from berth.pretrain.unpadded import NAME as UNPADDED

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
    (bench/attention_bench.py). Eager attention draws its dropout mask with the slow bernoulli_, though, so with
    attention dropout sdpa stays. GPUs keep sdpa (fused kernels). `unpadded` is not picked: on CPU it is level with
    eager at the mini recipe's batch of 16 and 1.03x-1.05x at 32, and its CUDA path has not run.
    """
    if cfg.attn_implementation == "flex_attention" and device_type != "cuda":
        raise BerthError(
            f"model.attn_implementation=flex_attention needs a CUDA device (torch's FlexAttention has no backward on "
            f"{device_type}); use auto"
        )
    if cfg.attn_implementation == "unpadded":
        return UNPADDED
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


def init_linear(*layers: nn.Linear, std: float = 0.02) -> None:
    """BERT's initialisation of a head berth adds: normal weights, zero biases."""
    for layer in layers:
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


class SentenceHead(nn.Module):
    """The [CLS]-task (NSP / SOP) head for encoders that ship none: BERT's pooler (dense + tanh) and a
    two-way classifier on the final [CLS] vector. Saved as sentence_head.safetensors beside the model, so
    continued pretraining picks it up; AutoModel* loaders ignore the file."""

    def __init__(self, hidden_size: int, initializer_range: float = 0.02):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, 2)
        init_linear(self.dense, self.classifier, std=initializer_range)

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


def encoder_flops(body: HFModel, seq_len: int) -> float:
    """Training FLOPs per token of an encoder body without its embeddings (nanoGPT's 6N + 12 L H T)."""
    cfg = body.config
    weights = sum(p.numel() for p in body.parameters()) - sum(p.numel() for p in body.embeddings.parameters())
    return 6 * weights + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def vocab_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, H) -> (N, V) fp32 logits over the real vocabulary: the padding rows of the tied output matrix are
    left out of the matmul, never predicted and given no gradient. Cutting the weight rather than the logits
    keeps the logits contiguous; log-softmax on a strided slice was a tenth of a CPU step."""
    return F.linear(hidden, weight[:vocab_size], bias[:vocab_size]).float()


def mlm_outputs(logits: torch.Tensor, mlm_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the N masked positions: logits (N, V), labels (N,)."""
    return {
        "mlm_loss": F.cross_entropy(logits, mlm_labels, reduction="sum"),
        "mlm_correct": (logits.argmax(-1) == mlm_labels).sum(),
        "mlm_count": torch.tensor(mlm_labels.numel(), device=logits.device),
    }


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


def cls_vectors(sequence: torch.Tensor, cls_positions: torch.Tensor | None) -> torch.Tensor:
    """(R, L, H) -> (B, H): each example's [CLS] vector, at row starts or, packed, at `cls_positions`."""
    return sequence[:, 0] if cls_positions is None else sequence.flatten(0, 1).index_select(0, cls_positions)


def sentence_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["next_sentence_label"] >= 0).sum().float()


class MaskedLMObjective(Objective):
    """Masked LM (+ NSP/SOP) sums for one batch, running the MLM head on the masked positions only
    (`berth.pretrain.objective.Objective`).

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
        tasks = ("mlm", "nsp") if sentence_task else ("mlm",)
        self.figure_names = tuple(f"{task}_{figure}" for task in tasks for figure in ("loss", "correct", "count"))

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
        modern = is_modernbert(self.model)
        body = self.model.model if modern else self.model.bert
        sequence = encode(body, input_ids, token_type_ids, attention_mask, position_ids, sequence_ids)  # (R, L, H)
        hidden = sequence.flatten(0, 1).index_select(0, mlm_positions)  # (N, H)
        head, decoder = (self.model.head, self.model.decoder) if modern else self.mlm_head()
        logits = vocab_logits(head(hidden), decoder.weight, decoder.bias, self.vocab_size)  # (N, V)
        out = mlm_outputs(logits, mlm_labels)
        if not self.sentence_task:
            return out
        cls = cls_vectors(sequence, cls_positions)  # (B, H)
        if self.sentence_head is not None:
            return {**out, **sentence_outputs(self.sentence_head(cls), next_sentence_label)}
        pooler = self.model.bert.pooler  # BERT's own pooler and NSP head, on every example's [CLS]
        logits = self.model.cls.seq_relationship(pooler.activation(pooler.dense(cls)))  # (B, 2)
        return {**out, **sentence_outputs(logits, next_sentence_label)}

    def mlm_head(self) -> tuple[nn.Module, nn.Linear]:
        predictions = self.model.cls.predictions
        return predictions.transform, predictions.decoder

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mlm = torch.tensor(float(batch["mlm_labels"].numel()), device=batch["mlm_labels"].device)
        return torch.stack([mlm, sentence_targets(batch)])  # [2]

    def loss_terms(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([out["mlm_loss"], out.get("nsp_loss", torch.zeros_like(out["mlm_loss"]))])  # [2]

    def external_parameters(self) -> list[tuple[nn.Module, list[nn.Parameter]]]:
        """The output matrix is cut in `vocab_logits`, outside its own module's forward: ZeRO-3 must gather it
        in this module's."""
        decoder = self.model.decoder if is_modernbert(self.model) else self.model.cls.predictions.decoder
        return [(self, [p for p in (decoder.weight, decoder.bias) if p is not None])]

    def exports(self, weights: dict[str, torch.Tensor]) -> list[Export]:
        inner = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
        head = {k.removeprefix("sentence_head."): v for k, v in weights.items() if k.startswith("sentence_head.")}
        role = "The encoder with its masked-LM head"
        return [Export("", self.model, inner, "fill-mask", role, {SENTENCE_HEAD: head} if head else {})]

    def flops_per_token(self, seq_len: int, mask_prob: float) -> float:
        """With the MLM head's share only on masked tokens."""
        return encoder_flops(self.model.base_model, seq_len) + 6 * self.model.config.hidden_size * (
            self.model.config.vocab_size * mask_prob
        )

    def load_heads(self, init: str) -> None:
        if self.sentence_head is not None:
            load_sentence_head(self.sentence_head, init)
