"""Replaced-token detection (ELECTRA, Clark et al. 2020): `data.objective=rtd`.

A generator a fraction of the discriminator's width (`model.generator_width`, ELECTRA's 1/4 by default) learns
masked LM on the masked positions; a token sampled from its output replaces each masked position; the
discriminator, the encoder berth exports, learns on every real token whether it was replaced. The loss is the
generator's mean MLM loss plus `data.rtd_weight` (ELECTRA's 50) times the discriminator's mean binary
cross-entropy, plus the [CLS] task on the discriminator's [CLS] vector (berth's `SentenceHead`). No gradient
flows through the sampling. Generator and discriminator share the token embeddings.

The sample at a masked position is drawn by Gumbel-max from uniform numbers the collator drew for that position
from its example's own stream (`berth.pretrain.masking`): the replacements, like the masks, do not depend on the
process count, the batch composition or a resume.

BERT backbone: transformers' ELECTRA classes, so the export loads as `ElectraForPreTraining` and the generator as
`ElectraForMaskedLM` (which shares embeddings the way ELECTRA does: `embedding_size` is the discriminator's width
and the generator projects it to its own). ModernBERT backbone: the discriminator is a `ModernBertModel` with
berth's replaced-token head beside it (`rtd_head.safetensors`); the generator a narrower `ModernBertModel` whose
token embeddings are the shared matrix times a projection, exported as a `ModernBertForMaskedLM` whose
embedding matrix is that product (the same logits, exactly).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForPreTraining,
    ModernBertForMaskedLM,
    ModernBertModel,
)

from berth.core.models import HFModel
from berth.pretrain.backbone import encode
from berth.pretrain.config import MODEL_SIZES, ModelConfig, generator_shape
from berth.pretrain.masking import sample_buckets
from berth.pretrain.model import (
    NEVER,
    SENTENCE_HEAD,
    SentenceHead,
    cls_vectors,
    encoder_flops,
    init_linear,
    load_sentence_head,
    mlm_outputs,
    modernbert_config,
    padded_vocab_size,
    resolve_attention,
    sentence_outputs,
    sentence_targets,
    vocab_logits,
)
from berth.pretrain.objective import Export, Objective
from berth.runtime.engines import tied_pairs

# berth's replaced-token head for a ModernBERT discriminator, saved beside model.safetensors.
RTD_HEAD = "rtd_head.safetensors"
GENERATOR_DIR = "generator"


def sample_replacements(logits: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """(N, V) logits and (N, K) uniform draws -> (N,) token ids, each drawn from its softmax by Gumbel-max in two
    levels: a bucket of about sqrt(V) tokens by its log-mass plus Gumbel noise, then a token of that bucket by its
    logit plus noise (K = buckets + bucket size: `berth.pretrain.masking.sample_draw_count`).

    Exact sampling, with about 2 sqrt(V) draws rather than V per position. A sample changes only where two noisy
    scores nearly tie, so rounding differences in the logits (another process count or batch shape) change few:
    noise of 1e-3 in the logits of 4,000 positions over 8,000 tokens changed 2 samples, where an inverse-CDF draw
    over all V tokens changed 108 (tests/test_rtd.py has the 1e-5 case).
    """
    count, vocab = logits.shape
    buckets, size = sample_buckets(vocab)
    padded = F.pad(logits.float(), (0, buckets * size - vocab), value=-math.inf).view(count, buckets, size)
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(draws.float().clamp(tiny, 1 - 2**-24)))  # (N, K)
    bucket = (padded.logsumexp(-1) + gumbel[:, :buckets]).argmax(-1)  # (N,)
    inside = padded[torch.arange(count, device=logits.device), bucket]  # (N, size)
    return bucket * size + (inside + gumbel[:, buckets:]).argmax(-1)


class DiscriminatorHead(nn.Module):
    """ELECTRA's discriminator head (dense, GELU, one logit per token), for encoders that ship none (ModernBERT)."""

    def __init__(self, hidden_size: int, initializer_range: float = 0.02):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dense_prediction = nn.Linear(hidden_size, 1)
        init_linear(self.dense, self.dense_prediction, std=initializer_range)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (...)
        return self.dense_prediction(F.gelu(self.dense(hidden))).squeeze(-1)


class ProjectedEmbedding(nn.Module):
    """Token embeddings of width G made from a shared (V, H) embedding matrix and an H -> G projection: E P^T.

    The matrix is held as a parameter tied to the discriminator's, not as a shared module: every engine treats a
    tied parameter as it treats the MLM output matrix (FSDP2 loads a shared module's second name as a plain tensor).
    """

    def __init__(self, shared: nn.Embedding, width: int):
        super().__init__()
        self.shared_weight = shared.weight  # (V, H), the discriminator's own parameter
        self.padding_idx = shared.padding_idx
        self.project = nn.Linear(shared.embedding_dim, width, bias=False)
        # E P^T keeps the shared matrix's scale when P's entries have variance 1 / H
        nn.init.normal_(self.project.weight, std=shared.embedding_dim**-0.5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (R, L) -> (R, L, G)
        return self.project(F.embedding(input_ids, self.shared_weight, self.padding_idx))


class ModernBertGenerator(nn.Module):
    """A narrower ModernBERT with its MLM head, over the discriminator's token embeddings (`ProjectedEmbedding`)."""

    def __init__(self, config: HFModel, shared: nn.Embedding, attention: str):
        super().__init__()
        full = ModernBertForMaskedLM._from_config(config, attn_implementation=attention)
        self.config = full.config
        self.model, self.head = full.model, full.head  # (the full model's own tied decoder matrix is dropped)
        self.decoder_bias = nn.Parameter(full.decoder.bias.detach().clone())
        self.model.embeddings.tok_embeddings = ProjectedEmbedding(shared, config.hidden_size)

    @property
    def embedding(self) -> ProjectedEmbedding:
        return self.model.embeddings.tok_embeddings


def electra_config(
    cfg: ModelConfig, vocab_size: int, pad_id: int, width: int, heads: int, embedding: int
) -> ElectraConfig:
    layers, _ = MODEL_SIZES[cfg.size]
    return ElectraConfig(
        vocab_size=padded_vocab_size(vocab_size, cfg.pad_vocab_multiple),
        embedding_size=embedding,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=2,
        pad_token_id=pad_id,
    )


class ReplacedTokenObjective(Objective):
    """Generator and discriminator of replaced-token detection (`berth.pretrain.objective.Objective`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        special: dict[str, int],
        sentence_task: bool,
        rtd_weight: float,
        device_type: str = "cpu",
    ):
        super().__init__()
        self.vocab_size, self.rtd_weight, self.sentence_task = vocab_size, rtd_weight, sentence_task
        self.modern = cfg.architecture == "modernbert"
        attention = resolve_attention(cfg, device_type)
        _, hidden = MODEL_SIZES[cfg.size]
        width, heads = generator_shape(cfg)
        self.discriminator: HFModel
        self.generator: HFModel
        if self.modern:
            config = modernbert_config(cfg, vocab_size, special)
            self.discriminator = ModernBertModel._from_config(config, attn_implementation=attention)
            self.rtd_head = DiscriminatorHead(hidden)
            small = modernbert_config(cfg, vocab_size, special)
            small.hidden_size, small.num_attention_heads, small.intermediate_size = width, heads, width * 3 // 2
            self.generator = ModernBertGenerator(small, self.discriminator.embeddings.tok_embeddings, attention)
        else:
            pad = special["pad"]
            self.discriminator = ElectraForPreTraining._from_config(
                electra_config(cfg, vocab_size, pad, hidden, hidden // 64, hidden), attn_implementation=attention
            )
            self.generator = ElectraForMaskedLM._from_config(
                electra_config(cfg, vocab_size, pad, width, heads, hidden), attn_implementation=attention
            )
            # ELECTRA shares every embedding (tokens, positions, types and their norm); the output matrix is the token
            # one. Tied parameters rather than one shared module, as in ProjectedEmbedding.
            ours, theirs = self.generator.electra.embeddings, self.discriminator.electra.embeddings
            for name, param in theirs.named_parameters():
                module, _, attribute = name.rpartition(".")
                setattr(ours.get_submodule(module), attribute, param)
            self.generator.generator_lm_head.weight = theirs.word_embeddings.weight
        with torch.no_grad():
            self.generator_bias[vocab_size:] = NEVER  # padding rows: never predicted, also not by fill-mask
        self.sentence_head = SentenceHead(hidden) if sentence_task else None
        tasks = ("mlm", "rtd", "nsp") if sentence_task else ("mlm", "rtd")
        self.figure_names = (
            *(f"{task}_{figure}" for task in tasks for figure in ("loss", "correct", "count")),
            "rtd_replaced",
            "rtd_found",
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # (R, L) masked
        token_type_ids: torch.Tensor,  # (R, L)
        attention_mask: torch.Tensor,  # (R, L)
        mlm_positions: torch.Tensor,  # (N,) flat indices into R * L
        mlm_labels: torch.Tensor,  # (N,) the original tokens there
        mlm_draws: torch.Tensor,  # (N, K) uniform draws for the sample at each masked position
        next_sentence_label: torch.Tensor,  # (B,), -100 where there is no [CLS] task
        position_ids: torch.Tensor | None = None,  # (R, L), packed batches only
        sequence_ids: torch.Tensor | None = None,  # (R, L), packed batches only
        cls_positions: torch.Tensor | None = None,  # (B,), packed batches only
    ) -> dict[str, torch.Tensor]:
        packing = (position_ids, sequence_ids)
        logits = self.generator_logits(input_ids, token_type_ids, attention_mask, mlm_positions, *packing)  # (N, V)
        out = mlm_outputs(logits, mlm_labels)
        with torch.no_grad():
            sampled = sample_replacements(logits, mlm_draws)  # (N,)
        flat = input_ids.flatten().index_copy(0, mlm_positions, sampled)  # (R * L,)
        replaced = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
        replaced[mlm_positions] = sampled != mlm_labels
        sequence = encode(self.discriminator_body, flat.view_as(input_ids), token_type_ids, attention_mask, *packing)
        real = attention_mask.flatten().bool()  # (R * L,)
        head = self.rtd_head if self.modern else self.discriminator.discriminator_predictions
        scores = head(sequence).flatten()[real].float()  # (T,) one logit per real token
        target = replaced[real]
        guess = scores > 0
        out.update(
            rtd_loss=F.binary_cross_entropy_with_logits(scores, target.float(), reduction="sum"),
            rtd_correct=(guess == target).sum(),
            rtd_count=real.sum(),
            rtd_replaced=target.sum(),
            rtd_found=(guess & target).sum(),
        )
        if self.sentence_head is not None:
            out.update(sentence_outputs(self.sentence_head(cls_vectors(sequence, cls_positions)), next_sentence_label))
        return out

    @property
    def generator_bias(self) -> nn.Parameter:  # (V,) the generator's output bias
        return self.generator.decoder_bias if self.modern else self.generator.generator_lm_head.bias

    @property
    def discriminator_body(self) -> HFModel:
        return self.discriminator if self.modern else self.discriminator.electra

    def generator_logits(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mlm_positions: torch.Tensor,
        position_ids: torch.Tensor | None,
        sequence_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """(N, V) fp32 logits of the generator at the masked positions."""
        body = self.generator.model if self.modern else self.generator.electra
        sequence = encode(body, input_ids, token_type_ids, attention_mask, position_ids, sequence_ids)  # (R, L, G)
        hidden = sequence.flatten(0, 1).index_select(0, mlm_positions)  # (N, G)
        if self.modern:
            embedding = self.generator.embedding
            # hidden G^T with G = E P^T, as (hidden P) E^T: no (V, G) matrix per step
            wide = self.generator.head(hidden) @ embedding.project.weight  # (N, H)
            return vocab_logits(wide, embedding.shared_weight, self.generator_bias, self.vocab_size)
        lm_head = self.generator.generator_lm_head
        return vocab_logits(self.generator.generator_predictions(hidden), lm_head.weight, lm_head.bias, self.vocab_size)

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = batch["mlm_labels"].device
        mlm = torch.tensor(float(batch["mlm_labels"].numel()), device=device)
        tokens = batch["attention_mask"].sum().float()
        return torch.stack([mlm, tokens, sentence_targets(batch)])  # [3]

    def loss_terms(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        nsp = out.get("nsp_loss", torch.zeros_like(out["mlm_loss"]))
        return torch.stack([out["mlm_loss"], self.rtd_weight * out["rtd_loss"], nsp])  # [3]

    def external_parameters(self) -> list[tuple[nn.Module, list[nn.Parameter]]]:
        """The generator's output matrices are read in `generator_logits`, outside their modules' forward."""
        if self.modern:
            embedding = self.generator.embedding
            return [(self, [embedding.project.weight, embedding.shared_weight, self.generator_bias])]
        lm_head = self.generator.generator_lm_head
        return [(self, [lm_head.weight, lm_head.bias])]

    def exports(self, weights: dict[str, torch.Tensor]) -> list[Export]:
        weights = dict(weights)
        for name, first in tied_pairs(self):  # a gathered state dict may name a shared matrix once
            weights.setdefault(name, weights[first])

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}

        sentence = {SENTENCE_HEAD: part("sentence_head.")} if self.sentence_head is not None else {}
        discriminator = part("discriminator.")
        generator = part("generator.")
        role = "The discriminator of replaced-token detection (ELECTRA): the encoder to fine-tune"
        generator_role = "The generator of replaced-token detection: a small masked-LM model, for fill-mask"
        if not self.modern:
            return [
                Export("", self.discriminator, discriminator, "feature-extraction", role, sentence),
                Export(GENERATOR_DIR, self.generator, generator, "fill-mask", generator_role),
            ]
        head = {RTD_HEAD: part("rtd_head.")}
        shared = generator.pop("model.embeddings.tok_embeddings.shared_weight")  # (V, H)
        project = generator.pop("model.embeddings.tok_embeddings.project.weight")  # (G, H)
        generator["model.embeddings.tok_embeddings.weight"] = shared.float() @ project.float().T  # (V, G)
        generator["decoder.bias"] = generator.pop("decoder_bias")
        export = ModernBertForMaskedLM(self.generator.config)
        return [
            Export("", self.discriminator, discriminator, "feature-extraction", role, {**head, **sentence}),
            Export(GENERATOR_DIR, export, generator, "fill-mask", generator_role),
        ]

    def flops_per_token(self, seq_len: int, mask_prob: float) -> float:
        """Both bodies on every token, the generator's output layer on the masked ones, the head on all."""
        generator = self.generator.model if self.modern else self.generator.electra
        hidden = self.discriminator_body.config.hidden_size
        vocab = self.discriminator_body.config.vocab_size
        bodies = encoder_flops(self.discriminator_body, seq_len) + encoder_flops(generator, seq_len)
        return bodies + 6 * hidden * vocab * mask_prob + 6 * hidden * hidden

    def load_heads(self, init: str) -> None:
        if self.sentence_head is not None:
            load_sentence_head(self.sentence_head, init)
