"""Benchmark of the pretraining data path (issue targets: prepare < 60 s; collator < 5% of a mini-model step).

    .venv/bin/python bench/data_bench.py [--repeats 20]

1. Prepares the whole embedded corpus (People's Daily with its word segmentation + review training texts)
   from an empty cache: tokenization, word alignment (jieba for the reviews), sentence split, epoch 0.
2. Times berth's MaskingCollator on batches of 32 and a training step (forward, backward, AdamW) of the mini
   model (BertForPreTraining L4-H256, seq 128), interleaved in one loop so that machine noise hits both,
   and reports the collator's time as a share of the step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import BertConfig, BertForPreTraining

from berth.core.config import load_config
from berth.pretrain.config import PretrainConfig
from berth.pretrain.masking import EpochExamples, MaskingCollator
from berth.pretrain.prepare import format_stats, prepare
from berth.tokenizer.train import ensure_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(PretrainConfig, "configs/pretrain/mini_zh.yaml", [f"data.cache_dir={cache}"])
        tokenizer = ensure_tokenizer(cfg.tokenizer.path, cfg.tokenizer.config)
        start = time.perf_counter()
        prepared = prepare(cfg, tokenizer)
        prepare_s = time.perf_counter() - start
        print(format_stats(prepared))
        examples = EpochExamples(prepared.examples("train", 0), cfg.data.seed, epoch=0)

        collator = MaskingCollator(cfg.data, prepared.special)
        model = BertForPreTraining(
            BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=1024,
                max_position_embeddings=512,
            )
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        collate_s, step_s = [], []
        b = args.batch_size
        for r in range(args.repeats + 2):
            rows = [examples[i] for i in range(r * b, (r + 1) * b)]
            t0 = time.perf_counter()
            batch = collator(rows)
            t1 = time.perf_counter()
            out = model(
                input_ids=batch["input_ids"],
                token_type_ids=batch["token_type_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                next_sentence_label=batch["next_sentence_label"],
            )
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if r >= 2:  # warm-up
                collate_s.append(t1 - t0)
                step_s.append(t2 - t1)

    collate, step = statistics.median(collate_s), statistics.median(step_s)
    print(f"prepare (whole embedded corpus, empty cache): {prepare_s:.1f} s  (target < 60 s)")
    print(f"collator: {collate * 1e3:.2f} ms per batch of {b}; mini-model step: {step * 1e3:.1f} ms")
    print(f"collator share of a step: {collate / step:.2%}  (target < 5%)")


if __name__ == "__main__":
    main()
