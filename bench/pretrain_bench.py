"""berth's pretraining step against the Hugging Face recipe, interleaved in one run, counting real tokens.

    .venv/bin/python bench/pretrain_bench.py [--size mini] [--steps 30] [--batch-size 32] [--precision bf16]
        (MFU is printed on GPUs whose peak berth knows, or with --override train.peak_tflops=N)
        [--baseline-attention sdpa|eager] [--override model.attention_dropout=0.1 ...]

Baseline: what run_mlm.py does -- BertForMaskedLM, texts tokenized with special tokens, concatenated and cut
into max_seq_len blocks (group_texts, so no padding), DataCollatorForLanguageModeling(mlm_probability=0.15),
the MLM head over every position, AdamW. berth: BertForPreTraining with NSP, examples from `berth prepare`,
berth's collator, the MLM head on the masked positions only. Same model size, corpus, batch, sequence length
and precision; both steps run alternately in one loop so machine noise hits both. Peak memory is measured in
a separate process per side: on GPU the allocator's peak, on CPU the peak anonymous resident memory (sampled
every millisecond) above what was resident before the steps, i.e. activations, gradients and optimizer work.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

from berth.core.config import load_config
from berth.pretrain.config import PretrainConfig
from berth.pretrain.train import PretrainingStage, peak_flops
from berth.runtime.loop import Loop
from berth.tokenizer.train import ensure_tokenizer


def setup(args):
    overrides = [
        f"model.size={args.size}",
        f"train.batch_size={args.batch_size}",
        f"data.max_seq_len={args.seq_len}",
        f"train.precision={args.precision}",
        "train.progress_bar=false",
        *args.override,
        "model.architecture=bert",  # the baseline is BertForMaskedLM: the same encoder on both sides
    ]
    cfg = load_config(PretrainConfig, "configs/pretrain/mini_zh.yaml", overrides)
    stage = PretrainingStage(cfg, lambda: ensure_tokenizer(cfg.tokenizer.path, cfg.tokenizer.config))
    loop = Loop(cfg, stage)  # berth's own training step, exactly as `berth pretrain` runs it
    loop.build()
    return cfg, loop


def berth_side(cfg, loop):
    # the loop's own data path, as `berth pretrain` runs it: batches prepared train.prefetch steps ahead in a thread
    steps = loop.steps().__enter__()
    stream = (batch for step in steps for batch in step)

    def step() -> int:
        batch = next(stream)
        loop.train_step([batch])
        return int(batch["attention_mask"].sum())

    return step


def baseline_side(cfg, loop, attention: str):
    prepared, accelerator = loop.stage.prepared, loop.accelerator
    torch.manual_seed(0)
    # a copy: the attention choice is stored on the config, which berth's model reads at every forward
    config = copy.deepcopy(loop.stage.objective.model.config)
    model = BertForMaskedLM._from_config(config, attn_implementation=attention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    tokenizer = prepared.tokenizer
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    # run_mlm's group_texts: every document as [CLS] ... [SEP], concatenated, cut into max_seq_len blocks.
    docs = prepared.documents["train"]["input_ids"][:20000]
    stream = [t for ids in docs for t in (prepared.special.cls, *ids, prepared.special.sep)]
    size = cfg.data.max_seq_len
    blocks = [stream[i : i + size] for i in range(0, len(stream) - size, size)]
    position = 0

    def step() -> int:
        nonlocal position
        rows = blocks[position : position + cfg.train.batch_size]
        position += cfg.train.batch_size
        batch = collator([{"input_ids": r} for r in rows])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())

    return step


def rss_anon_mb() -> float:
    """Anonymous resident memory: what the process allocated, without memory-mapped dataset files."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon"))) / 1024


class PeakMemory:
    """Peak memory while the steps run, above what was resident before: sampled every millisecond on CPU."""

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return self
        self.base = self.peak = rss_anon_mb()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_anon_mb())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.running = False
            self.thread.join()

    @property
    def above_base_mb(self) -> float:
        return self.peak - self.base


def peak_memory(args, side: str) -> float:
    """Peak resident memory (MiB) of a process running only `side` for a few steps."""
    command = [
        sys.executable,
        __file__,
        "--memory-of",
        side,
        "--steps",
        "5",
        "--size",
        args.size,
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--precision",
        args.precision,
        "--baseline-attention",
        args.baseline_attention,
        "--override",
        *args.override,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="mini")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--memory-of", choices=["berth", "baseline"])
    parser.add_argument("--override", nargs="*", default=[], help="config overrides; model.* apply to both sides")
    parser.add_argument(
        "--baseline-attention",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="the baseline's attention (transformers' default: sdpa); berth's follows model.attn_implementation",
    )
    args = parser.parse_args()
    cfg, loop = setup(args)
    if args.memory_of:
        step = berth_side(cfg, loop) if args.memory_of == "berth" else baseline_side(cfg, loop, args.baseline_attention)
        step()  # model, optimizer state and data set up before measuring
        with PeakMemory() as memory:
            for _ in range(args.steps):
                step()
        print(json.dumps({"peak_mb": memory.above_base_mb}))
        return

    sides = {"berth": berth_side(cfg, loop), "baseline": baseline_side(cfg, loop, args.baseline_attention)}
    timings: dict[str, list[float]] = {name: [] for name in sides}
    ratios = []
    for i in range(args.steps + 3):
        pair = {}
        for name, step in sides.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            pair[name] = tokens / (time.perf_counter() - start)
        if i >= 3:  # warm-up
            for name, speed in pair.items():
                timings[name].append(speed)
            ratios.append(pair["berth"] / pair["baseline"])
    speed = {name: statistics.median(v) for name, v in timings.items()}
    memory = {name: peak_memory(args, name) for name in sides}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    attention = (
        f"attention: berth {loop.stage.objective.model.config._attn_implementation}, baseline {args.baseline_attention}"
    )
    print(
        f"{args.size}, seq {args.seq_len}, batch {args.batch_size}, {args.precision}, {device}, {args.steps} steps, "
        f"{attention}"
    )
    peak = peak_flops(cfg)  # one device's dense bf16 peak, 0 when unknown (CPU, an unlisted GPU)
    for name in sides:
        # the same model FLOPs per token on both sides (berth's masked-only head counted), so MFU ratio = speed ratio
        mfu = f"   MFU {speed[name] * loop.stage.flops_per_token / peak:6.1%}" if peak else ""
        print(f"  {name:9s} {speed[name]:10.0f} real tokens/s   peak memory of a step {memory[name]:8.0f} MiB{mfu}")
    # What equal FLOP/s would give: the MLM head costs 6 H V per predicted token, on the masked share for berth and on
    # every position for the recipe; the encoder's 6N + 12 L H T is the same on both sides.
    objective, seq_len = loop.stage.objective, cfg.data.max_seq_len
    berth_flops = objective.flops_per_token(seq_len, cfg.data.mask_prob)
    recipe_flops = objective.flops_per_token(seq_len, 1.0)
    print(
        f"  model FLOPs per real token: berth {berth_flops / 1e6:.1f} M, recipe {recipe_flops / 1e6:.1f} M "
        f"({recipe_flops / berth_flops:.2f}x: the speed-up at equal FLOP/s)"
    )
    quartiles = statistics.quantiles(ratios, n=4)
    print(
        f"  speed-up  {statistics.median(ratios):.2f}x (median of per-step ratios; quartiles "
        f"{quartiles[0]:.2f}-{quartiles[2]:.2f})   memory ratio {memory['berth'] / memory['baseline']:.2f}"
    )


if __name__ == "__main__":
    main()
