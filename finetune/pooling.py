"""How window outputs become a document's: the poolers (a trained layer over the windows' vectors), the
aggregations of window logits, and the evaluation pass that runs every window once (`window_outputs`) and combines
them per document (`combine_windows`; `document_logits` does both, for evaluation and `berth predict`)."""

from __future__ import annotations

from typing import Any, Protocol, cast

import torch
from torch import nn

from berth.finetune.batching import encoder_batch, eval_order, evaluating, gather_in_order
from berth.finetune.windows import Encoded


class PooledModel(Protocol):
    """A classifier with a pooler (`berth.finetune.modeling.WindowClassifier`): document logits from window
    vectors."""

    def documents(self, vectors: torch.Tensor, doc: torch.Tensor, num_docs: int) -> torch.Tensor: ...


class WindowPooler(nn.Module):
    """Attention pooling over the windows of a document: a learned score per window's [CLS] vector, a softmax
    within each document, and the weighted sum of the vectors."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)

    def forward(self, vectors: torch.Tensor, doc: torch.Tensor, num_docs: int) -> torch.Tensor:
        # vectors [W, H], doc [W] -> [D, H]
        scores = self.score(vectors).squeeze(-1).float()  # [W]
        top = torch.full((num_docs,), float("-inf"), device=scores.device).scatter_reduce(0, doc, scores, "amax")
        weights = torch.exp(scores - top[doc])  # [W]
        total = torch.zeros(num_docs, device=scores.device).index_add(0, doc, weights)
        weights = (weights / total[doc]).to(vectors.dtype)
        pooled = torch.zeros(num_docs, vectors.shape[-1], dtype=vectors.dtype, device=vectors.device)
        return pooled.index_add(0, doc, weights[:, None] * vectors)


class HierarchicalPooler(nn.Module):
    """The third classic way to read a long text, after truncation and windows: a small transformer encoder over a
    document's window vectors, with a learned [CLS] of its own in front and learned window positions, whose output
    at that [CLS] is the document's vector. Post-LN blocks with GELU, like BERT's; padding windows are masked."""

    def __init__(self, hidden_size: int, layers: int = 1, max_windows: int = 64, dropout: float = 0.1):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(hidden_size))
        self.positions = nn.Embedding(max_windows + 1, hidden_size)  # 0: the [CLS]; later windows share the last
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        block = nn.TransformerEncoderLayer(
            hidden_size,
            nhead=max(1, hidden_size // 64),
            dim_feedforward=4 * hidden_size,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)

    @staticmethod
    def layers_in(weights: dict[str, torch.Tensor]) -> int:
        """How many encoder layers a saved pooler has (its file names them)."""
        return len({key.split(".")[2] for key in weights if key.startswith("encoder.layers.")})

    def forward(self, vectors: torch.Tensor, doc: torch.Tensor, num_docs: int) -> torch.Tensor:
        # vectors [W, H], doc [W] (windows of a document in order) -> [D, H]
        counts = torch.zeros(num_docs, dtype=torch.long, device=doc.device).index_add(0, doc, torch.ones_like(doc))
        longest = int(counts.max()) if num_docs else 0
        # [W] each window's 1-based place in its document, in the order the windows come
        order = torch.argsort(doc, stable=True)
        starts = torch.cumsum(counts, 0) - counts  # [D]
        slot = torch.empty_like(doc)
        slot[order] = torch.arange(len(doc), device=doc.device) - starts[doc[order]] + 1
        rows = torch.zeros(num_docs, longest + 1, vectors.shape[-1], dtype=vectors.dtype, device=vectors.device)
        rows[:, 0] = self.cls.to(vectors.dtype)
        rows[doc, slot] = vectors
        places = torch.arange(longest + 1, device=doc.device).clamp(max=self.positions.num_embeddings - 1)
        rows = rows + self.positions(places).to(vectors.dtype)[None]  # [D, 1 + Wmax, H]
        padding = torch.arange(longest + 1, device=doc.device)[None] > counts[:, None]  # [D, 1 + Wmax]
        return self.encoder(rows, src_key_padding_mask=padding)[:, 0]  # [D, H]


POOLERS = {"attention": WindowPooler, "hierarchical": HierarchicalPooler}  # aggregations with a trained layer

# Aggregations computed from the window logits alone (no trained layer), in the order evaluations report them.
WINDOW_AGGREGATIONS = ("mean", "max", "prob_mean", "confidence", "margin")


def aggregate(window_logits: torch.Tensor, doc: torch.Tensor, num_docs: int, how: str) -> torch.Tensor:
    """Per-document scores [D, C] from window logits [W, C] (window w belongs to document doc[w]); their argmax is
    the prediction and their softmax the document's probabilities.

    mean        the mean of the logits: every window votes with its raw confidence
    max         the elementwise max of the logits: any window's strongest evidence for each class
    prob_mean   log of the mean of the window probabilities
    confidence  log of the mean of the window probabilities, each window weighted by how decided it is (its top
                probability above chance, 1/C): windows without the task's signal, if scored flat, barely count
    margin      the log-probabilities of the most decided window (the largest gap between its two most likely
                classes): one clear verdict outweighs any number of lukewarm windows
    """
    classes = window_logits.shape[-1]
    rows = doc[:, None].expand(-1, classes)
    if how == "mean":
        total = torch.zeros(num_docs, classes, dtype=window_logits.dtype).index_add(0, doc, window_logits)
        count = torch.zeros(num_docs, dtype=window_logits.dtype).index_add(
            0, doc, torch.ones_like(doc, dtype=window_logits.dtype)
        )
        return total / count[:, None]
    if how == "max":
        start = torch.full((num_docs, classes), float("-inf"), dtype=window_logits.dtype)
        return start.scatter_reduce(0, rows, window_logits, "amax")
    log_probs = torch.log_softmax(window_logits.double(), dim=-1)  # [W, C]
    probs = log_probs.exp()
    if how in ("prob_mean", "confidence"):
        if how == "prob_mean":
            weights = torch.ones(len(doc), dtype=probs.dtype)
        else:
            weights = probs.max(dim=-1).values - 1.0 / classes  # [W], 0 for a flat window
            # a document whose windows are all flat: every window counts the same
            decided = torch.zeros(num_docs, dtype=probs.dtype).index_add(0, doc, weights)
            weights = torch.where(decided[doc] > 0, weights, torch.ones_like(weights))
        total = torch.zeros(num_docs, classes, dtype=probs.dtype).index_add(0, doc, probs * weights[:, None])
        return (total / total.sum(-1, keepdim=True)).log().to(window_logits.dtype)
    if how == "margin":
        top2 = log_probs.topk(min(2, classes), dim=-1).values  # [W, 2]
        margin = top2[:, 0] - top2[:, -1]  # [W]
        best = torch.full((num_docs,), float("-inf"), dtype=margin.dtype).scatter_reduce(0, doc, margin, "amax")
        # the first window of each document that reaches its best margin
        index = torch.arange(len(doc))
        candidates = torch.where(margin == best[doc], index, torch.full_like(index, len(doc)))
        chosen = torch.full((num_docs,), len(doc), dtype=index.dtype).scatter_reduce(0, doc, candidates, "amin")
        # no window reaches it when the margins are NaN (a diverged model): its first window, NaN as the others
        first = torch.full((num_docs,), len(doc), dtype=index.dtype).scatter_reduce(0, doc, index, "amin")
        return log_probs[torch.where(chosen < len(doc), chosen, first)].to(window_logits.dtype)
    raise ValueError(f"unknown aggregation {how!r}")


@torch.no_grad()
def window_outputs(
    model: nn.Module, encoded: Encoded, pad_id: int, acc: Any, batch_size: int, vectors: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every window's logits [W, C] and, with `vectors`, its pooled vector [W, H] (on acc.device), in window order.
    Each process runs its share, in batches of similar length; every process gets all of them."""
    lengths = [len(ids) for ids in encoded.window_ids]
    found: list[tuple[int, tuple[torch.Tensor, torch.Tensor | None]]] = []
    for part in eval_order(lengths, batch_size, acc.process_index, acc.num_processes):
        rows = part.rows
        batch = encoder_batch([encoded.window_ids[w] for w in rows], [encoded.window_types[w] for w in rows], pad_id)
        logits, pooled = model(**{k: v.to(acc.device) for k, v in batch.items()})  # [B, C], [B, H] or None
        logits = logits.float().cpu()
        pooled = pooled.float().cpu() if vectors and pooled is not None else None
        found.extend((w, (logits[i], None if pooled is None else pooled[i])) for i, w in enumerate(part.mine))
    ordered = gather_in_order(acc, found, len(lengths))
    window_logits = torch.stack([row_logits for row_logits, _ in ordered])  # [W, C]
    if not vectors:
        return window_logits, None
    return window_logits, torch.stack([row_vector for _, row_vector in ordered]).to(acc.device)  # [W, H]


@torch.no_grad()
def combine_windows(
    model: nn.Module,
    acc: Any,
    logits: torch.Tensor,
    vectors: torch.Tensor | None,
    window_doc: list[int],
    num_docs: int,
    hows: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """{aggregation: [D, C]} from the windows' logits [W, C] (and vectors [W, H] for the model's own pooler) of
    documents window_doc; the caller turns dropout off."""
    doc = torch.tensor(window_doc)
    out = {how: aggregate(logits, doc, num_docs, how) for how in hows if how not in POOLERS}
    for how in hows:
        if how in POOLERS:
            assert vectors is not None, "the model's own pooler needs the window vectors"
            inner = cast(PooledModel, acc.unwrap_model(model))
            with torch.autocast(acc.device.type, enabled=False):
                out[how] = inner.documents(vectors, doc.to(acc.device), num_docs).float().cpu()
    return out


def document_logits(
    model: nn.Module, encoded: Encoded, pad_id: int, acc: Any, batch_size: int, hows: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Run every window and aggregate per document: {aggregation: [D, C]} for each of `hows`. Dropout is off."""
    with evaluating(model):
        logits, vectors = window_outputs(model, encoded, pad_id, acc, batch_size, any(h in POOLERS for h in hows))
        return combine_windows(model, acc, logits, vectors, encoded.window_doc, len(encoded.doc_windows), hows)
