"""Long-document robustness of a fine-tuned classifier, by every aggregation that needs no trained layer.

    .venv/bin/python bench/robustness_bench.py runs/demo/sentiment [--texts 500] [--distractors auto] [--no-in-domain]

Reads the run's resolved config.yaml and its final/ export, hides up to --texts test texts at the start, middle
and end of other text 3-8 windows long -- unrelated paragraphs (news), and the task's own neutral sentences
(in-domain) -- as the evaluation `berth finetune` runs at the end (`berth.finetune.robustness`), and prints, for
each, accuracy per position and aggregation, beside the texts alone, the texts at the end scored from only the
windows that hold some of them ("own end"), and the natural test split (all texts, and those longer than one
window). No training: the same weights, only the way windows combine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification

from berth.core.config import load_config
from berth.core.vocab import load_tokenizer
from berth.finetune.classification import ClassificationTask
from berth.finetune.config import FinetuneConfig
from berth.finetune.modeling import WindowClassifier
from berth.finetune.pooling import WINDOW_AGGREGATIONS
from berth.finetune.robustness import evaluate_robustness


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--texts", type=int, default=500)
    parser.add_argument("--distractors", default="auto")
    parser.add_argument("--no-in-domain", action="store_true", help="news only")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    final = args.run / "final"
    overrides = [
        f"model.init={final}",
        f"data.robustness_docs={args.texts}",
        f"data.distractors={args.distractors}",
        f"data.in_domain_robustness={str(not args.no_in_domain).lower()}",
        "data.aggregation=mean",  # no pooler: the window aggregations only
        "data.hidden_training=0",  # nothing is trained here
        "data.hidden_weight=1",
    ]
    cfg = load_config(FinetuneConfig, str(args.run / "config.yaml"), overrides)
    task = ClassificationTask(cfg, load_tokenizer(final))
    model = WindowClassifier(AutoModelForSequenceClassification.from_pretrained(final)).eval()
    acc = Accelerator(cpu=not torch.cuda.is_available())
    model = model.to(acc.device)
    evaluations = evaluate_robustness(task, model, acc, args.batch_size)
    natural, _ = task.evaluate(model, "test", acc, args.batch_size, "mean")
    print(
        f"{args.run}: natural test split: {len(task.splits['test'].doc_labels)} texts, "
        f"{natural['long_count']} longer than one window"
    )
    for key, found in evaluations.items():
        windows = found["windows"]
        print(
            f"\n{key}: {found['texts']} test texts hidden in {found['source']}, "
            f"{windows['min']}-{windows['max']} windows (mean {windows['mean']})"
        )
        # own: the same documents with only the windows that hold some of the text
        columns = ("alone", "start", "middle", "end", "own end", "test", "long")
        print(f"{'aggregation':12s} " + " ".join(f"{c:>7s}" for c in columns))
        for how in WINDOW_AGGREGATIONS:
            row = [found["alone"][how], *(found["accuracy"][p][how] for p in ("start", "middle", "end"))]
            row += [found["text_windows_only"]["end"][how], natural[f"accuracy_{how}"], natural[f"long_accuracy_{how}"]]
            print(f"{how:12s} " + " ".join(f"{100 * v:6.1f}%" for v in row))


if __name__ == "__main__":
    main()
