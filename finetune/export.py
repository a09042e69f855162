"""Model directories of a fine-tuning run: best/ while training, final/ with a model card at the end.

Both are Hugging Face format (config.json with id2label, model.safetensors, tokenizer files), so
AutoModelForSequenceClassification / AutoModelForTokenClassification and pipelines load them. config.json also
carries berth's settings (task, window length, stride, aggregation) for `berth predict`, and
window_pooler.safetensors holds the pooling layer (attention or hierarchical) when the model was trained with one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from berth.core.config import dump_config, portable_config
from berth.core.files import replace_dir, temporary_sibling
from berth.core.hub import card_metadata, hub_model_id
from berth.core.text import vocabulary_languages
from berth.core.vocab import load_tokenizer, write_vocab_txt
from berth.finetune.modeling import BERTH_KEY, POOLER_FILE, WindowClassifier
from berth.finetune.registry import task_kind
from berth.finetune.windows import WindowSettings

BEST = "best"


def _parts(model: torch.nn.Module) -> tuple[PreTrainedModel, torch.nn.Module | None]:
    """The transformers model and the window pooler (None without one).

    Decided by type: a transformers model is saved whole. Its attributes say nothing (ModernBERT's task models
    keep their encoder in `.model`), so only berth's own wrapper is unwrapped.
    """
    if isinstance(model, PreTrainedModel):
        return model, None
    if not isinstance(model, WindowClassifier):
        raise TypeError(f"cannot export {type(model).__name__}: neither a transformers model nor berth's classifier")
    return model.model, model.pooler


def save_model_dir(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    settings: WindowSettings,
    target: Path,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model beside `target` and put it in place (`replace_dir`): a kill leaves one whole version.
    `weights` is the whole state dict of `model` where the module itself holds only a shard of it."""
    hf_model, pooler = _parts(model)
    weights = weights if weights is not None else model.state_dict()
    inner, pooled = split_weights(model, weights)
    tmp = temporary_sibling(target)
    setattr(hf_model.config, BERTH_KEY, asdict(settings))
    hf_model.save_pretrained(tmp, state_dict=inner)
    tokenizer.save_pretrained(tmp)
    write_vocab_txt(tokenizer.get_vocab(), tmp / "vocab.txt")
    if pooler is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in pooled.items()}, str(tmp / POOLER_FILE))
    replace_dir(tmp, target)
    return target


def split_weights(
    model: torch.nn.Module, weights: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The state dict of `model` as (the transformers model's, the window pooler's)."""
    if isinstance(model, PreTrainedModel):
        return weights, {}
    inner = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    return inner, {k.removeprefix("pooler."): v for k, v in weights.items() if k.startswith("pooler.")}


def best_weights(model: torch.nn.Module, directory: Path) -> dict[str, torch.Tensor]:
    """The weights saved in `directory`, keyed as `model`'s state dict (its pooler's included)."""
    hf_model, pooler = _parts(model)
    weights = load_file(str(directory / "model.safetensors"))
    # Every key checked: one missing from the file would leave the in-memory weight silently in place.
    expected = set(hf_model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise RuntimeError(f"{directory}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    if hf_model is model:
        return weights
    pooled = load_file(str(directory / POOLER_FILE)) if pooler is not None else {}
    return {**{f"model.{k}": v for k, v in weights.items()}, **{f"pooler.{k}": v for k, v in pooled.items()}}


def _metric_rows(results: dict[str, Any]) -> str:
    rows = []
    for split in ("validation", "test"):
        for name, value in (results.get(split) or {}).items():
            if isinstance(value, float) and not name.startswith(("long_accuracy_", "accuracy_")):
                rows.append(f"| {split} | {name} | {value:.4f} |")
    return "\n".join(rows)


def model_card(cfg: Any, results: dict[str, Any], labels: list[str], languages: list[str]) -> str:
    kind = task_kind(cfg.task)
    meta = {
        "language": languages,
        "library_name": "transformers",
        "pipeline_tag": kind.pipeline_tag,
        "license": "apache-2.0",
        "tags": ["bert", "berth", kind.pipeline_tag],
        # hub datasets only: local files and the embedded datasets have no hub id
        "datasets": [cfg.data.dataset.removeprefix("hf:")] if cfg.data.dataset.startswith("hf:") else [],
        "metrics": list(kind.card_metrics),
    }
    if hub_model_id(cfg.model.init) and not cfg.model.from_scratch:
        meta["base_model"] = cfg.model.init
    settings = (
        f"windows of {cfg.data.max_seq_len} tokens, stride {cfg.data.stride}"
        if cfg.data.long_text == "windows"  # the default, and the only setting a task without truncation accepts
        else f"{cfg.data.long_text} truncation to {cfg.data.max_seq_len} tokens"
    )
    scratch = " (its architecture, random init)" if cfg.model.from_scratch else ""
    return f"""{card_metadata(meta)}

# {Path(cfg.output_dir).name}

A {kind.pipeline_tag} model fine-tuned with berth from `{cfg.model.init}`{scratch}
on {cfg.data.dataset or cfg.data.train_file}. Labels: {", ".join(labels)}. Long texts: {settings}.

```python
from transformers import pipeline
model = pipeline("{kind.pipeline_tag}", model="path/to/this/folder")
```

For texts longer than {cfg.data.max_seq_len} tokens use `berth predict path/to/this/folder --input FILE`,
which cuts and aggregates them as in training.

## Evaluation (best checkpoint, step {results.get("best_step")})

| split | metric | value |
|---|---|---|
{_metric_rows(results)}

## Training config

```yaml
{dump_config(cfg)}```
"""


def export_finetuned(best: Path, final: Path, cfg: Any, results: dict[str, Any]) -> Path:
    """final/ = the best checkpoint plus a model card; written beside and renamed into place."""
    tmp = temporary_sibling(final)
    shutil.copytree(best, tmp)
    config = json.loads((tmp / "config.json").read_text())
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    languages = vocabulary_languages(load_tokenizer(tmp).get_vocab())
    card = model_card(portable_config(cfg, final.parent), results, labels, languages)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    replace_dir(tmp, final)
    return final
