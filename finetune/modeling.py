"""The model of fine-tuning: a checkpoint loaded (or its architecture with fresh weights) with the checks users
need, and `WindowClassifier`, the classifier that reads long texts in windows."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from berth.core.errors import BerthError
from berth.core.hub import hub_model_id, hub_reachable
from berth.core.models import HFModel
from berth.finetune.pooling import HierarchicalPooler, WindowPooler

logger = logging.getLogger(__name__)

# Written into the exported model's config.json: how predict must cut and aggregate long texts.
BERTH_KEY = "berth"
# Beside the export's model.safetensors: the weights of the window pooler (attention or hierarchical), if any.
POOLER_FILE = "window_pooler.safetensors"


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def check_init(init: str) -> str:
    """A local model directory, or a hub id (which needs the hub). Errors name the path and what is wrong."""
    if not init:
        raise BerthError("model.init is empty: name a checkpoint directory (runs/pretrain/mini_zh/final) or hub id")
    path = Path(init)
    if path.exists():
        if not path.is_dir() or not is_model_dir(path):
            raise BerthError(f"model.init={init}: not a model directory (no config.json)")
        return str(path)
    if hub_model_id(init):
        if hub_reachable():
            return init
        raise BerthError(
            f"model.init={init}: no such directory, and the hub (where OWNER/NAME ids are found) is unreachable "
            "or offline mode is set"
        )
    raise BerthError(f"model.init={init}: no such directory")


def load_model_config(init: str, overrides: dict[str, Any]) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(init)
    except (OSError, ValueError) as exc:
        raise BerthError(f"{init}: cannot load its config: {str(exc).splitlines()[0]}") from None
    for key, value in overrides.items():
        if value is not None and (hasattr(config, key) or key == "classifier_dropout"):
            setattr(config, key, value)
    return config


def check_vocab(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, where: str) -> None:
    """The tokenizer's ids must all have an embedding row (a padded vocabulary may have more rows)."""
    if len(tokenizer) > config.vocab_size:
        raise BerthError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary holds "
            f"{config.vocab_size}; this checkpoint and tokenizer do not belong together"
        )


def dropout_overrides(hidden: float | None, attention: float | None, classifier: float) -> dict[str, Any]:
    # BERT's names, then ModernBERT's; a key the checkpoint's config does not have is left alone
    return {
        "hidden_dropout_prob": hidden,
        "attention_probs_dropout_prob": attention,
        "mlp_dropout": hidden,
        "embedding_dropout": hidden,
        "attention_dropout": attention,
        "classifier_dropout": classifier,
    }


def build_pretrained(auto_class: Any, init: str, config: PretrainedConfig, from_scratch: bool) -> torch.nn.Module:
    """The checkpoint's weights (task head freshly initialised), or the same architecture from random init."""
    if from_scratch:
        return auto_class.from_config(config)
    try:
        model = auto_class.from_pretrained(init, config=config)
    except (OSError, ValueError) as exc:
        raise BerthError(f"{init}: cannot load the model: {str(exc).splitlines()[0]}") from None
    logger.info("loaded %s from %s; the task head starts from random weights", type(model).__name__, init)
    return model


def input_names(model: torch.nn.Module) -> tuple[str, ...]:
    """What a transformers model's forward takes of a batch: input_ids, attention_mask and, where it takes them,
    token_type_ids (BERT does; RoBERTa-style and ModernBERT models may not). Read from the model as built, before
    an engine wraps it."""
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    return ("input_ids", "attention_mask", "token_type_ids") if takes_types else ("input_ids", "attention_mask")


def encoder_inputs(names: tuple[str, ...], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fields of `batch` that `input_names` named."""
    return {name: batch[name] for name in names}


def berth_settings(model_dir: str | Path) -> dict[str, Any]:
    """The fine-tuning settings a berth export carries in its config.json (empty for other checkpoints)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get(BERTH_KEY) or {}


class WindowClassifier(nn.Module):
    """A transformers sequence classifier, plus the pooler (attention or hierarchical) when documents are pooled.

    For BERT (a pooler, `dropout` and `classifier`) and ModernBERT (`head`, `drop` and `classifier`) the
    window vectors the classifier reads are returned beside the logits, so attention pooling can feed a
    document's pooled vector to the same classifier. Other models give logits only.
    """

    model: HFModel

    def __init__(self, model: HFModel, pooling: str = "", pooler_layers: int = 1):
        super().__init__()
        self.model = model
        self.kind = vector_kind(model)
        self.input_names = input_names(model)
        self.pooling = pooling  # "", attention or hierarchical
        if pooling and self.kind is None:
            raise BerthError(
                f"data.aggregation={pooling} needs a BERT (with a pooler) or ModernBERT classifier; "
                f"{type(model).__name__} gives logits only"
            )
        self.pooler: nn.Module | None = None
        if pooling == "attention":
            self.pooler = WindowPooler(model.config.hidden_size)
        elif pooling == "hierarchical":
            self.pooler = HierarchicalPooler(model.config.hidden_size, pooler_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        unit: torch.Tensor | None = None,
        num_units: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Window logits [W, C] and vectors [W, H] (None where the model gives logits only). With a pooler and
        `unit` [W] (the document of each window, windows of a document in order), the logits are the documents'
        [num_units, C]: pooling inside forward keeps DDP's and FSDP's hooks around every weight training uses."""
        if self.kind is None:
            batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
            return self.model(**encoder_inputs(self.input_names, batch)).logits, None
        if self.kind == "bert":
            out = self.model.base_model(
                input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
            )
            vectors = out.pooler_output  # [W, H]: the [CLS] vector through BERT's pooler
        else:  # ModernBERT: its classifier's own pooling ([CLS] or mean) and head
            hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask)[0]  # [W, L, H]
            if self.model.config.classifier_pooling == "mean":
                weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1)
            else:
                pooled = hidden[:, 0]
            vectors = self.model.head(pooled)  # [W, H]
        if unit is not None and self.pooler is not None:
            return self.documents(vectors, unit, num_units), vectors
        return self.classify(vectors), vectors

    def classify(self, vectors: torch.Tensor) -> torch.Tensor:
        drop = self.model.dropout if self.kind == "bert" else self.model.drop
        return self.model.classifier(drop(vectors))

    def documents(self, vectors: torch.Tensor, doc: torch.Tensor, num_docs: int) -> torch.Tensor:
        """Document logits [D, C] from window vectors [W, H] (windows of a document in order) by the pooler."""
        assert self.pooler is not None, "built without a pooler"
        return self.classify(self.pooler(vectors, doc, num_docs))


def vector_kind(model: HFModel) -> str | None:
    """ "bert" or "modernbert" when the classifier's window vectors can be read out, else None."""
    if all(hasattr(model, n) for n in ("classifier", "dropout")) and getattr(model.base_model, "pooler", None):
        return "bert"
    if model.config.model_type == "modernbert" and all(hasattr(model, n) for n in ("head", "drop", "classifier")):
        return "modernbert"
    return None
