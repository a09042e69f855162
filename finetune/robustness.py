"""Long documents whose verdict comes late: the robustness evaluation, run on the test split after training.

Natural long reviews mostly say what they think early, so windows and head truncation score alike on them. The
case sliding windows exist for is a verdict anywhere in a long text. Each document here is one test text placed at
the start, in the middle or at the end of other text, filled to between 3 and 8 windows
(`berth.finetune.hidden_text`), in two evaluations:

- news: paragraphs from another source (People's Daily's test share by default, or `data.distractors` = a file of
  one paragraph a line);
- in_domain (`data.in_domain_robustness`): sentences of the task's own validation texts that carry no verdict by
  the rule of `berth.finetune.neutral_text`, the text a reader of the task's domain writes around a verdict.

The same texts are also scored alone, so the loss from the surrounding text shows directly. Everything is drawn
from a fixed seed (ROBUSTNESS_SEED), so every run, whatever its train.seed, and every aggregation sees the same
documents. This module only evaluates; hidden-text training (`berth.finetune.extra_text`) builds its own documents
from the training split.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from berth.finetune.batching import evaluating
from berth.finetune.config import FinetuneConfig
from berth.finetune.hidden_text import POSITIONS, HiddenSet, build_documents, distractor_paragraphs, encode_hidden
from berth.finetune.neutral_text import MIN_NEUTRAL_SENTENCES, evaluation_sentences
from berth.finetune.pooling import WINDOW_AGGREGATIONS, combine_windows, document_logits, window_outputs
from berth.finetune.windows import Encoded, WindowSettings, encode_texts

logger = logging.getLogger(__name__)

# The evaluation's draw, fixed: it does not move with train.seed, so runs of different seeds (and their
# differences) are measured on the same documents, pairwise.
ROBUSTNESS_SEED = 0
# results.json keys of the two evaluations
NEWS, IN_DOMAIN = "robustness", "robustness_in_domain"


class EvaluatedTask(Protocol):
    """What the evaluation reads of a classification task (`berth.finetune.classification.ClassificationTask`)."""

    cfg: FinetuneConfig
    tokenizer: PreTrainedTokenizerBase
    settings: WindowSettings
    pooling: str  # "", attention or hierarchical
    texts: dict[str, list[str]]
    splits: dict[str, Encoded]


def robustness_sets(task: EvaluatedTask) -> dict[str, tuple[HiddenSet, str]]:
    """results key -> (the test texts hidden among the evaluation's surrounding text, that text's source), for the
    evaluations the config asks for and has text for. Drawn from ROBUSTNESS_SEED, not train.seed: runs of
    different seeds are scored on the same documents."""
    data, out = task.cfg.data, {}
    paragraphs, source = distractor_paragraphs(data.distractors, task.tokenizer)
    if paragraphs:
        out[NEWS] = (robustness_set(task, paragraphs), source)
    if data.in_domain_robustness:
        sentences = evaluation_sentences(
            task.texts["train"], task.splits["train"].doc_labels, task.texts["validation"], ROBUSTNESS_SEED
        )
        if len(sentences) >= MIN_NEUTRAL_SENTENCES:
            out[IN_DOMAIN] = (robustness_set(task, sentences), "validation sentences left undecided")
        else:
            logger.warning(
                "in-domain robustness skipped: %d neutral validation sentences, fewer than %d",
                len(sentences),
                MIN_NEUTRAL_SENTENCES,
            )
    return out


def robustness_set(task: EvaluatedTask, paragraphs: list[str]) -> HiddenSet:
    """The test texts hidden among `paragraphs`."""
    return build_documents(
        task.texts["test"],
        task.splits["test"].doc_labels,
        paragraphs,
        task.tokenizer,
        task.settings,
        task.cfg.data.robustness_docs,
        ROBUSTNESS_SEED,
    )


def evaluate_robustness(task: EvaluatedTask, model: torch.nn.Module, acc: Any, batch_size: int) -> dict[str, Any]:
    """results key -> `evaluate_hidden` of each evaluation the config asks for (none without their text)."""
    return {
        key: evaluate_hidden(task, model, acc, batch_size, docs, source)
        for key, (docs, source) in robustness_sets(task).items()
        if docs.alone
    }


def evaluate_hidden(
    task: EvaluatedTask, model: torch.nn.Module, acc: Any, batch_size: int, docs: HiddenSet, source: str
) -> dict[str, Any]:
    """Accuracy by aggregation on test texts hidden at the start, middle and end of other text 3-8 windows
    long, beside the same texts alone. Each document window runs through the model once."""
    data = task.cfg.data
    pad = task.tokenizer.pad_token_id
    hows = (*WINDOW_AGGREGATIONS, task.pooling) if task.pooling else WINDOW_AGGREGATIONS
    encoded, found = encode_hidden(task.tokenizer, docs, task.settings)
    with evaluating(model):
        logits, vectors = window_outputs(model, encoded, pad, acc, batch_size, vectors=bool(task.pooling))
        hidden = combine_windows(model, acc, logits, vectors, encoded.window_doc, len(docs.texts), hows)
        # The same documents from only the windows that hold some of the text (the distractor windows left
        # out): what stays below `alone` there is lost inside the text's own windows, which no way of combining
        # windows can win back; the rest is lost to distractor windows outvoting them.
        keep = [
            w
            for ws, doc in zip(encoded.doc_windows, found, strict=True)
            for w, held in zip(ws, doc.held, strict=True)
            if held or not doc.own  # a text of no tokens leaves nothing out
        ]
        own_logits = combine_windows(
            model,
            acc,
            logits[keep],
            None if vectors is None else vectors[keep],
            [encoded.window_doc[w] for w in keep],
            len(docs.texts),
            hows,
        )
    alone = encode_texts(task.tokenizer, docs.alone, task.settings, labels=docs.alone_labels)
    alone_logits = document_logits(model, alone, pad, acc, batch_size, hows)
    labels, positions = torch.tensor(docs.labels), np.array(docs.positions)
    windows = [len(ws) for ws in encoded.doc_windows]

    def accuracy(logits: torch.Tensor, gold: torch.Tensor) -> float:
        return float((logits.argmax(-1) == gold).float().mean())

    def by_position(logits: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        return {
            position: {how: accuracy(logits[how][positions == position], labels[positions == position]) for how in hows}
            for position in POSITIONS
        }

    return {
        "source": source,
        "hidden_training": data.hidden_training,  # what the model was trained with, for the report
        "hidden_weight": data.hidden_weight,
        "hidden_filler": data.hidden_filler,
        "texts": len(docs.alone),
        "windows": {"min": min(windows), "mean": round(sum(windows) / len(windows), 2), "max": max(windows)},
        "accuracy": by_position(hidden),
        "text_windows_only": by_position(own_logits),
        "alone": {how: accuracy(alone_logits[how], torch.tensor(docs.alone_labels)) for how in hows},
        # per document, in the draw's order (the same for every run): for paired comparisons between runs
        "right": {how: right(hidden[how], labels) for how in hows},
        "alone_right": {how: right(alone_logits[how], torch.tensor(docs.alone_labels)) for how in hows},
    }


def right(logits: torch.Tensor, labels: torch.Tensor) -> str:
    """[D, C] logits and [D] labels -> one character per document, 1 where the argmax is the label, else 0."""
    return "".join("1" if ok else "0" for ok in (logits.argmax(-1) == labels).tolist())
