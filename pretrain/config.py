from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from berth.core.config import check_rates
from berth.core.hub import HubConfig
from berth.corpora.config import CorpusConfig
from berth.runtime.config import TrainConfig


@dataclass(frozen=True)
class TokenizerRef:
    # A directory holding a trained tokenizer (tokenizer.json / vocab.txt).
    path: str = "runs/tokenizer/zh"
    # How to build it when `path` holds none yet (a tokenizer config; its output_dir is set to `path`).
    # Empty: a missing tokenizer is an error.
    config: str = "configs/tokenizer/zh.yaml"


@dataclass(frozen=True)
class DataConfig:
    # mlm: masked LM on the chosen tokens. rtd: replaced-token detection (ELECTRA): a small generator learns masked
    # LM, and the exported encoder learns on every token whether the generator replaced it (berth.pretrain.rtd).
    objective: Literal["mlm", "rtd"] = "mlm"
    # rtd: the weight of the discriminator's mean loss beside the generator's mean MLM loss (ELECTRA's 50).
    rtd_weight: float = 50.0
    max_seq_len: int = 128
    # The [CLS] task: nsp (B is the next text half the time, else from another document), sop (A and B in
    # order or swapped), none (MLM only: full sentences packed across documents with [SEP] between).
    sentence_task: Literal["nsp", "sop", "none"] = "nsp"
    # Share of examples with a shorter random target length, so the model also sees short inputs.
    short_seq_prob: float = 0.1
    # Share of non-special tokens chosen for prediction; of those, mask_replace_prob become [MASK],
    # random_replace_prob a random token, and the rest stay unchanged (BERT's 80/10/10).
    mask_prob: float = 0.15
    # A share that moves linearly from mask_prob at the first optimizer step to this at the last (e.g. 0.3 to
    # 0.15; Wettig et al. 2023 found rates above 15% better); 0: mask_prob throughout. Held-out evaluation masks
    # at the rate the run ends at.
    mask_prob_end: float = 0.0
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    # Mask whole words: every piece of a chosen word is predicted, with one 80/10/10 draw per word.
    whole_word_mask: bool = True
    # Word boundaries for whole-word masking: auto takes the corpus's own segmentation where it has one
    # (peoples_daily_words) and runs jieba on Chinese text without one; jieba always runs jieba; none
    # uses WordPiece's ## continuations only (every CJK character is then a word of its own).
    word_segmenter: Literal["auto", "jieba", "none"] = "auto"
    # Share of documents (chosen by a hash of the text) held out for evaluation.
    eval_fraction: float = 0.01
    seed: int = 0
    num_proc: int = 2
    # Prepared datasets live in a subdirectory named by a hash of everything that shapes them.
    cache_dir: str = "runs/cache"
    # Dynamic padding rounds the batch length up to a multiple of this (tensor-core friendly).
    pad_to_multiple_of: int = 8
    # Pack the examples of a batch into as few rows of max_seq_len as they fit, each attending to itself only
    # (block-diagonal attention mask, positions restarting per example): fewer padding tokens to compute.
    pack_sequences: bool = True

    def __post_init__(self) -> None:
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be at least 8; got {self.max_seq_len}")
        for name in ("short_seq_prob", "mask_prob", "mask_replace_prob", "random_replace_prob", "eval_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1); got {self.mask_prob}")
        if not 0.0 <= self.mask_prob_end < 1.0:
            raise ValueError(
                f"mask_prob_end must be in (0, 1), or 0 for mask_prob throughout; got {self.mask_prob_end}"
            )
        if self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise ValueError(
                "mask_replace_prob + random_replace_prob must not exceed 1; "
                f"got {self.mask_replace_prob} + {self.random_replace_prob}"
            )
        if self.num_proc < 1 or self.pad_to_multiple_of < 1:
            raise ValueError("num_proc and pad_to_multiple_of must be at least 1")
        if not self.rtd_weight > 0:
            raise ValueError(f"rtd_weight must be above 0; got {self.rtd_weight}")
        if self.objective == "mlm" and self.rtd_weight != DataConfig.rtd_weight:
            raise ValueError(f"rtd_weight={self.rtd_weight} does nothing with objective=mlm (no discriminator)")

    def mask_rate(self, step: int, total_steps: int) -> float:
        """The masking rate of optimizer step `step` (0-based) of a run of `total_steps`."""
        if not self.mask_prob_end:
            return self.mask_prob
        progress = step / max(1, total_steps - 1)
        return self.mask_prob + (self.mask_prob_end - self.mask_prob) * min(1.0, progress)

    @property
    def final_mask_rate(self) -> float:
        return self.mask_prob_end or self.mask_prob


# Google's BERT miniatures (layers, hidden size); heads = hidden / 64, feed-forward = 4 x hidden.
MODEL_SIZES = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
    "large": (24, 1024),
}


@dataclass(frozen=True)
class ModelConfig:
    # bert: transformers' BertForPreTraining (post-LN, learned positions). modernbert: ModernBertForMaskedLM
    # (pre-LN, RoPE, GeGLU), with berth's own [CLS]-task head when data.sentence_task is nsp or sop.
    architecture: Literal["bert", "modernbert"] = "bert"
    size: Literal["tiny", "mini", "small", "medium", "base", "large"] = "mini"
    # A checkpoint directory (or hub id) to continue pretraining from; empty: from scratch.
    init: str = ""
    # auto: sdpa, except when training on CPU without attention dropout, where eager is faster (see
    # pretrain.model.resolve_attention). unpadded: the linear layers run on the real tokens only, attention per
    # packed row, or per example on CUDA (pretrain.unpadded). flex_attention: packed rows masked by a FlexAttention
    # block mask of their examples (pretrain.document_mask), on CUDA, without attention dropout. All compute the
    # same attention (tested); exports load with transformers' own.
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "unpadded"] = "auto"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512
    # The embedding matrix is padded to a multiple of this (faster matmuls); padding rows are never predicted.
    pad_vocab_multiple: int = 64
    # data.objective=rtd: the generator's width (hidden size, heads and feed-forward) as a share of the
    # discriminator's, with as many layers (ELECTRA: 1/4 to 1/3).
    generator_width: float = 0.25

    def __post_init__(self) -> None:
        check_rates(hidden_dropout=self.hidden_dropout, attention_dropout=self.attention_dropout)
        if self.attn_implementation == "flex_attention" and self.attention_dropout:
            raise ValueError(
                f"model.attn_implementation=flex_attention takes no attention dropout (transformers' FlexAttention "
                f"path has none); set model.attention_dropout=0 (it is {self.attention_dropout})"
            )
        if self.max_position_embeddings < 8 or self.pad_vocab_multiple < 1:
            raise ValueError("max_position_embeddings must be at least 8 and pad_vocab_multiple at least 1")
        if not 0 < self.generator_width <= 1:
            raise ValueError(f"generator_width must be in (0, 1]; got {self.generator_width}")


def generator_shape(cfg: ModelConfig) -> tuple[int, int]:
    """(hidden size, heads) of the replaced-token generator: `generator_width` of the discriminator's, with an
    even head width (rotary positions need one) of at least 8."""
    _, hidden = MODEL_SIZES[cfg.size]
    heads = max(1, round(hidden // 64 * cfg.generator_width))
    head_width = max(8, 2 * round(hidden * cfg.generator_width / heads / 2))
    return heads * head_width, heads


@dataclass(frozen=True)
class PretrainTrainConfig(TrainConfig):
    """The shared train section (berth.runtime.config) with pretraining's defaults and its own fields."""

    max_steps: int = 1000
    lr: float = 5e-4
    warmup_steps: int = 100
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 500
    keep_checkpoints: int = 2
    # Evaluation batches (0: the whole validation split).
    eval_batches: int = 0
    # Peak FLOP/s of one device, for MFU; 0 uses a table for known GPUs and leaves MFU out elsewhere.
    peak_tflops: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_batches < 0 or self.peak_tflops < 0:
            raise ValueError("eval_batches and peak_tflops must be >= 0")


@dataclass(frozen=True)
class PretrainConfig:
    output_dir: str = "runs/pretrain/mini_zh"
    tokenizer: TokenizerRef = field(default_factory=TokenizerRef)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def __post_init__(self) -> None:
        # Keys that the rest of the config makes dead are refused, as in fine-tuning (a key is set when it differs
        # from its default).
        data, train = self.data, self.train
        if not data.whole_word_mask and data.word_segmenter != DataConfig.word_segmenter:
            raise ValueError(
                f"data.word_segmenter={data.word_segmenter} does nothing with data.whole_word_mask=false "
                "(every token is masked on its own)"
            )
        if data.objective == "mlm" and self.model.generator_width != ModelConfig.generator_width:
            raise ValueError(
                f"model.generator_width={self.model.generator_width} does nothing with data.objective=mlm "
                "(no generator)"
            )
        if data.objective == "rtd" and self.model.init:
            raise ValueError(
                "model.init with data.objective=rtd: berth starts replaced-token detection from random weights (its "
                "generator and discriminator train together); continue a checkpoint with data.objective=mlm"
            )
        if data.objective == "rtd" and self.model.attn_implementation == "flex_attention":
            raise ValueError(
                "model.attn_implementation=flex_attention is tested with data.objective=mlm only; use auto or sdpa"
            )
        if data.mask_prob_end and train.budget_minutes:
            raise ValueError(
                "data.mask_prob_end with train.budget_minutes: a falling mask rate needs the run's step count before "
                "the first step, and a budget fixes it after timing steps; set train.max_steps"
            )
        if not data.eval_fraction and train.eval_batches != PretrainTrainConfig.eval_batches:
            raise ValueError(
                f"train.eval_batches={train.eval_batches} does nothing with data.eval_fraction=0 (nothing held out)"
            )
