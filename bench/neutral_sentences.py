"""The in-domain neutral sentences of a classification config (`berth.finetune.neutral_text`), to judge the rule.

    .venv/bin/python bench/neutral_sentences.py configs/finetune/reviews_sentiment.yaml [--show 20] [--pool training]

Prints how many sentences of the validation texts (the in-domain robustness evaluation's; or of the training
texts, which `data.hidden_filler=in_domain` trains among) the rule keeps, and the first --show of them in the
order the documents take them.
"""

from __future__ import annotations

import argparse
import logging

from berth.core.config import load_config
from berth.finetune.config import FinetuneConfig
from berth.finetune.data import check_texts, label_values, load_splits
from berth.finetune.neutral_text import evaluation_sentences, training_sentences
from berth.finetune.robustness import ROBUSTNESS_SEED


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--show", type=int, default=20)
    parser.add_argument("--pool", choices=("evaluation", "training"), default="evaluation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the rule's count: kept of all sentences
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    splits = load_splits(cfg.data)
    train = check_texts(splits["train"], cfg.data.text_column)
    names = label_values(splits["train"], cfg.data.label_column)
    index = {name: i for i, name in enumerate(sorted(set(names) - {""}))}
    labels = [index.get(name, -1) for name in names]  # "" is a missing label
    if args.pool == "evaluation":
        validation = check_texts(splits["validation"], cfg.data.text_column)
        found = evaluation_sentences(train, labels, validation, ROBUSTNESS_SEED)
    else:
        found = training_sentences(train, labels, cfg.train.seed)
    print(f"{len(found)} neutral sentences ({args.pool} pool); the first {min(args.show, len(found))}:")
    for sentence in found[: args.show]:
        print(f"  {sentence}")


if __name__ == "__main__":
    main()
