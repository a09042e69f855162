"""Export to <output_dir>/final/ in Hugging Face format: loads with AutoModelForPreTraining / ForMaskedLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from berth.core.config import dump_config, portable_config
from berth.core.files import replace_dir, temporary_sibling
from berth.core.hub import card_metadata, hub_model_id
from berth.core.layout import FINAL_DIR
from berth.core.text import vocabulary_languages
from berth.core.vocab import write_vocab_txt
from berth.pretrain.model import SENTENCE_HEAD
from berth.runtime.engines import Engine
from berth.runtime.tracking import read_metrics


def model_card(cfg: Any, metrics: dict[str, Any], languages: list[str], base_model: str = "") -> str:
    """A short model card with the hub's YAML metadata and the last evaluation."""
    meta = {
        "language": languages,
        "library_name": "transformers",
        "pipeline_tag": "fill-mask",
        "license": "apache-2.0",
        "tags": [cfg.model.architecture, "berth", "fill-mask", "pretraining"],
        # hub datasets only: local files and the embedded corpora have no hub id
        "datasets": [s.removeprefix("hf:") for s in cfg.corpus.sources if s.startswith("hf:")],
        "metrics": ["accuracy", "perplexity"],
    }
    if base_model:
        meta["base_model"] = base_model
    architecture = "ModernBERT" if cfg.model.architecture == "modernbert" else "BERT"
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float))
    evaluation = (
        f"| metric | value |\n|---|---|\n{rows}"
        if rows
        else "None: no documents were held out (`data.eval_fraction` is 0, or the corpus is too small)."
    )
    return f"""{card_metadata(meta)}

# {Path(cfg.output_dir).name}

A {architecture} encoder ({cfg.model.size}) pretrained with berth on {", ".join(cfg.corpus.sources)}:
masked-LM ({cfg.data.mask_prob:.0%} of tokens, {"whole-word" if cfg.data.whole_word_mask else "token"} masking)
plus the [CLS] task `{cfg.data.sentence_task}`, sequences of {cfg.data.max_seq_len} tokens.

```python
from transformers import pipeline
fill = pipeline("fill-mask", model="path/to/this/folder")
```

## Evaluation (held-out documents, fixed mask)

{evaluation}

## Training config

```yaml
{dump_config(cfg)}```
"""


def export_pretrained(
    accelerator: Accelerator,
    engine: Engine,
    prepared: torch.nn.Module,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: Any,
    out: Path,
    name: str = FINAL_DIR,
) -> Path:
    """`prepared` is the objective as `engine` spread it (DDP, FSDP, ...); `model` the encoder inside it.
    Writes out/<name> (final/ by default), with berth's [CLS]-task head beside it when the model has none."""
    final = out / name
    # Gathered on every process (FSDP / DeepSpeed shard it), written by the main one.
    state_dict = engine.full_state_dict(prepared)
    if accelerator.is_main_process:
        tmp = temporary_sibling(final)
        inner = untie({k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}, model)
        model.save_pretrained(tmp, state_dict=inner)
        head = {
            k.removeprefix("sentence_head."): v.contiguous()
            for k, v in state_dict.items()
            if k.startswith("sentence_head.")
        }
        if head:
            save_file(head, tmp / SENTENCE_HEAD)
        tokenizer.save_pretrained(tmp)
        write_vocab_txt(tokenizer.get_vocab(), tmp / "vocab.txt")
        evals = [m for m in read_metrics(out) if "eval_mlm_accuracy" in m]
        last = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")}
        languages = vocabulary_languages(tokenizer.get_vocab())
        card = model_card(portable_config(cfg, out), last, languages, hub_model_id(cfg.model.init))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def untie(weights: dict[str, Any], model: PreTrainedModel) -> dict[str, Any]:
    """Without the copies of tied matrices (the MLM output = the input embeddings): a gathered state dict (DeepSpeed)
    holds them as separate tensors, and the export is then the same file whatever the engine."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    drop = {t for t, s in tied.items() if t in weights and s in weights and torch.equal(weights[t], weights[s])}
    return {k: v for k, v in weights.items() if k not in drop}
