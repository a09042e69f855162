"""Every evaluation pass of berth on splits of 1, 3 and 17 rows at batch 8, under whatever engine the launch asks
for; the figures go to a JSON file (written by the main process). tests/test_lockstep.py runs it in one process
and launched on two (FSDP2, ZeRO-3), where a process that ran fewer forward passes than the other would break the
collectives, and compares the figures.

    python tests/lockstep_eval.py OUT.json PRETRAIN.yaml CLASSIFICATION.yaml NER.yaml
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from berth.core.config import load_config
from berth.core.process import end_launched_process
from berth.finetune.config import FinetuneConfig
from berth.finetune.ner import NerEncoded, window_logits
from berth.finetune.pooling import document_logits
from berth.finetune.robustness import evaluate_robustness
from berth.finetune.train import FinetuneStage
from berth.finetune.windows import encode_texts
from berth.pretrain.config import PretrainConfig
from berth.pretrain.masking import EpochExamples
from berth.pretrain.train import PretrainingStage, evaluate
from berth.runtime.loop import Loop

SIZES = (1, 3, 17)
BATCH = 8


def built(cfg: Any, stage: Any) -> Loop:
    loop = Loop(cfg, stage)
    loop.build()
    return loop


def floats(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor | np.ndarray):
        return tree.tolist()
    if isinstance(tree, dict):
        return {str(k): floats(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [floats(v) for v in tree]
    return tree


def pretraining(path: str) -> dict[str, Any]:
    cfg = load_config(PretrainConfig, path)
    stage = PretrainingStage(cfg)
    loop = built(cfg, stage)
    held_out = stage.prepared.examples("validation", 0)
    assert len(held_out) >= max(SIZES), len(held_out)
    out = {}
    for n in SIZES:
        examples = EpochExamples([held_out[i] for i in range(n)], cfg.data.seed, epoch=0)
        out[n] = evaluate(
            loop.model,
            stage.objective.figure_names,
            examples,
            replace(cfg, train=replace(cfg.train, batch_size=BATCH)),
            stage.collate,
            loop.accelerator,
        )
    return out


def finetuning(path: str) -> tuple[Any, Loop]:
    """The task and the built loop of a fine-tuning config (the stage makes its task when the loop builds it)."""
    cfg = load_config(FinetuneConfig, path)
    stage = FinetuneStage(cfg)
    loop = built(cfg, stage)
    return stage.task, loop


def classification(path: str) -> dict[str, Any]:
    task, loop = finetuning(path)
    acc = loop.accelerator
    out: dict[str, Any] = {}
    for n in SIZES:
        # n documents; as windows (more rows than documents) and head-truncated (one row each)
        name = f"first{n}"
        labels = task.splits["validation"].doc_labels[:n]
        task.texts[name] = task.texts["validation"][:n]
        task.splits[name] = encode_texts(task.tokenizer, task.texts[name], task.settings, labels=labels)
        metrics, predictions = task.evaluate(loop.model, name, acc, BATCH)
        out[n] = {
            "metrics": metrics,
            "predictions": predictions,
            "truncated": task.evaluate_truncated(loop.model, name, acc, BATCH),
            "logits": document_logits(
                loop.model, task.splits[name], task.tokenizer.pad_token_id, acc, BATCH, ("mean",)
            ),
        }
    # the hidden-text documents of the test split (robustness_docs of them)
    out["robustness"] = evaluate_robustness(task, loop.model, acc, BATCH)
    return out


def ner(path: str) -> dict[str, Any]:
    task, loop = finetuning(path)
    acc = loop.accelerator
    encoded = task.splits["validation"]
    out: dict[str, Any] = {}
    for n in SIZES:
        assert len(encoded.window_ids) >= n
        first = NerEncoded(window_ids=encoded.window_ids[:n])
        out[n] = window_logits(loop.model, task.input_names, first, task.tokenizer.pad_token_id, acc, BATCH)
    out["validation"] = task.evaluate(loop.model, "validation", acc, BATCH)[0]
    return out


def main(result: str, pretrain_config: str, classification_config: str, ner_config: str) -> dict[str, Any]:
    figures = {
        "pretraining": pretraining(pretrain_config),
        "classification": classification(classification_config),
        "ner": ner(ner_config),
    }
    figures = floats(figures)
    if int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
        Path(result).write_text(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main(*sys.argv[1:])
    end_launched_process(0)  # as berth's command line ends: no abort from gloo's threads at exit
