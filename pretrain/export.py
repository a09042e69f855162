"""Export to <output_dir>/final/ in Hugging Face format: masked LM's encoder loads with AutoModelForPreTraining /
ForMaskedLM, replaced-token detection's discriminator with AutoModel (ElectraForPreTraining for BERT)."""

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
from berth.pretrain.objective import Export, Objective
from berth.runtime.engines import Engine
from berth.runtime.tracking import read_metrics


def objective_line(cfg: Any) -> str:
    """What the model learned, for its card."""
    rate = f"{cfg.data.mask_prob:.0%}" + (f" falling to {cfg.data.mask_prob_end:.0%}" if cfg.data.mask_prob_end else "")
    masking = f"{rate} of tokens, {'whole-word' if cfg.data.whole_word_mask else 'token'} masking"
    if cfg.data.objective == "rtd":
        return (
            f"replaced-token detection (ELECTRA): a generator of {cfg.model.generator_width:g} the width learned "
            f"masked LM ({masking}) and the discriminator, on every token, whether the generator replaced it"
        )
    return f"masked LM ({masking})"


def model_card(cfg: Any, metrics: dict[str, Any], languages: list[str], part: Export, base_model: str = "") -> str:
    """A short model card with the hub's YAML metadata and the last evaluation."""
    meta = {
        "language": languages,
        "library_name": "transformers",
        "pipeline_tag": part.pipeline_tag,
        "license": "apache-2.0",
        "tags": [cfg.model.architecture, "berth", part.pipeline_tag, "pretraining", cfg.data.objective],
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
    usage = (
        'fill = pipeline("fill-mask", model="path/to/this/folder")'
        if part.pipeline_tag == "fill-mask"
        else 'encode = pipeline("feature-extraction", model="path/to/this/folder")'
    )
    return f"""{card_metadata(meta)}

# {Path(cfg.output_dir).name}{"/" + part.folder if part.folder else ""}

{part.role}. A {architecture} encoder ({cfg.model.size}) pretrained with berth on {", ".join(cfg.corpus.sources)}:
{objective_line(cfg)}, plus the [CLS] task `{cfg.data.sentence_task}`, sequences of {cfg.data.max_seq_len} tokens.

```python
from transformers import pipeline
{usage}
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
    objective: Objective,
    tokenizer: PreTrainedTokenizerBase,
    cfg: Any,
    out: Path,
    name: str = FINAL_DIR,
) -> Path:
    """`prepared` is `objective` as `engine` spread it (DDP, FSDP, ...). Writes out/<name> (final/ by default):
    each folder the objective names (the encoder in final/ itself; for replaced-token detection the generator in
    final/generator/), each with the tokenizer, a model card and berth's own heads beside the model."""
    final = out / name
    # Gathered on every process (FSDP / DeepSpeed shard it), written by the main one.
    state_dict = engine.full_state_dict(prepared)
    if accelerator.is_main_process:
        tmp = temporary_sibling(final)
        evals = [m for m in read_metrics(out) if "eval_mlm_accuracy" in m]
        last = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")}
        languages = vocabulary_languages(tokenizer.get_vocab())
        portable = portable_config(cfg, out)
        for part in objective.exports(state_dict):
            folder = tmp / part.folder
            part.model.save_pretrained(folder, state_dict=untie(part.weights, part.model))
            for file, weights in part.extra.items():
                save_file({k: v.contiguous() for k, v in weights.items()}, folder / file)
            tokenizer.save_pretrained(folder)
            write_vocab_txt(tokenizer.get_vocab(), folder / "vocab.txt")
            card = model_card(portable, last, languages, part, hub_model_id(cfg.model.init))
            (folder / "README.md").write_text(card, encoding="utf-8")
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def untie(weights: dict[str, Any], model: PreTrainedModel) -> dict[str, Any]:
    """Without the copies of tied matrices (the MLM output = the input embeddings): a gathered state dict (DeepSpeed)
    holds them as separate tensors, and the export is then the same file whatever the engine."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    drop = {t for t, s in tied.items() if t in weights and s in weights and torch.equal(weights[t], weights[s])}
    return {k: v for k, v in weights.items() if k not in drop}
