"""Benchmark of the pretraining data path (targets: prepare < 60 s; the loader < 5% of a mini-model step; prepared
data after 6 epochs within 1.5x of after 1).

    .venv/bin/python bench/data_bench.py [--repeats 20] [--epochs 6]

1. Prepares the whole embedded corpus (People's Daily with its word segmentation + review training texts)
   from an empty cache: tokenization, word alignment (jieba for the reviews), sentence split, epoch 0's summary.
2. Draws every example of epoch 0 as the training loader does (`EpochStream`, chunk by chunk) and times it,
   with the summary each epoch starts with (a pass over every group that counts its examples).
3. Times berth's MaskingCollator on batches of 32 and a training step (forward, backward, AdamW) of the mini
   model (BertForPreTraining L4-H256, seq 128), interleaved in one loop so that machine noise hits both, and
   reports the loader (drawing, amortised per batch, plus the collator) as a share of the step.
4. Measures the cache on disk after epoch 0 and after `--epochs` epochs, beside the size one epoch's examples
   would take written out as Arrow (what a per-epoch file costs, for comparison).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
from transformers import BertConfig, BertForPreTraining

from berth.core.config import load_config
from berth.pretrain.config import PretrainConfig
from berth.pretrain.data import EXAMPLE_FEATURES
from berth.pretrain.masking import EpochExamples, MaskingCollator
from berth.pretrain.prepare import format_stats, prepare
from berth.tokenizer.train import ensure_tokenizer


def disk_bytes(root: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(PretrainConfig, "configs/pretrain/mini_zh.yaml", [f"data.cache_dir={cache}"])
        tokenizer = ensure_tokenizer(cfg.tokenizer.path, cfg.tokenizer.config)
        start = time.perf_counter()
        prepared = prepare(cfg, tokenizer)
        prepare_s = time.perf_counter() - start
        print(format_stats(prepared))
        disk_one = disk_bytes(cache)

        stream = prepared.examples("train", 0)
        start = time.perf_counter()
        drawn = list(stream)
        draw_s = time.perf_counter() - start
        tokens = sum(len(e["input_ids"]) for e in drawn)
        written = datasets.Dataset.from_list(drawn, features=EXAMPLE_FEATURES)
        written.save_to_disk(str(Path(scratch) / "epoch"))
        epoch_file = disk_bytes(scratch)

        start = time.perf_counter()
        prepared.examples("train", 1)  # an epoch's start: its summary, drawn once over every group
        summary_s = time.perf_counter() - start
        for epoch in range(2, args.epochs):
            prepared.examples("train", epoch)
        for epoch in range(1, args.epochs):
            prepared.examples("validation", epoch)
        disk_many = disk_bytes(cache)

        examples = EpochExamples(stream, cfg.data.seed, epoch=0)
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
    draw = (summary_s + draw_s) / len(drawn) * b  # an epoch's summary and drawing, amortised over its batches
    mib = 2**20
    print(f"prepare (whole embedded corpus, empty cache): {prepare_s:.1f} s  (target < 60 s)")
    print(
        f"drawing epoch 0 on the fly: {len(drawn)} examples, {tokens} tokens in {draw_s:.1f} s "
        f"({tokens / draw_s:,.0f} tokens/s), after the epoch's summary ({summary_s:.1f} s, num_proc "
        f"{cfg.data.num_proc}); together {draw * 1e3:.2f} ms per batch of {b}"
    )
    print(f"collator: {collate * 1e3:.2f} ms per batch of {b}; mini-model step: {step * 1e3:.1f} ms")
    print(f"loader (drawing + collator) share of a step: {(draw + collate) / step:.2%}  (target < 5%)")
    print(
        f"cache on disk: {disk_one / mib:.1f} MiB after epoch 0, {disk_many / mib:.1f} MiB after {args.epochs} epochs "
        f"({disk_many / disk_one:.2f}x; target <= 1.5x); one epoch's examples written out would be "
        f"{epoch_file / mib:.1f} MiB each"
    )


if __name__ == "__main__":
    main()
