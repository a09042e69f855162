"""Loading a checkpoint to fine-tune (or its architecture with fresh weights), with the checks users need."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from berth.core.errors import BerthError
from berth.core.hub import hub_model_id, hub_reachable

logger = logging.getLogger(__name__)

# Written into the exported model's config.json: how predict must cut and aggregate long texts.
BERTH_KEY = "berth"


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


def takes_token_types(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes token_type_ids (BERT does; RoBERTa-style and ModernBERT models may not)."""
    inner = getattr(model, "module", model)  # DDP wraps the model
    return "token_type_ids" in inspect.signature(inner.forward).parameters


def encoder_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and, when the model takes them, token_type_ids."""
    names = (
        ("input_ids", "attention_mask", "token_type_ids")
        if takes_token_types(model)
        else ("input_ids", "attention_mask")
    )
    return {name: batch[name] for name in names}


def berth_settings(model_dir: str | Path) -> dict[str, Any]:
    """The fine-tuning settings a berth export carries in its config.json (empty for other checkpoints)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get(BERTH_KEY) or {}
