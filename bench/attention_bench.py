"""One attention implementation against another in berth's pretraining step, on the same batches, interleaved.

    .venv/bin/python bench/attention_bench.py [--architecture modernbert|bert] [--baseline sdpa|eager]
        [--against eager|unpadded|flex_attention] [--steps 30] [--batch-size 32] [--precision bf16|fp32]

Backs `model.attn_implementation: auto` (on CPU without attention dropout: eager over sdpa, and unpadded over
eager), and times `flex_attention` (packed rows under a FlexAttention document mask; CUDA only) against sdpa with
the dense block-diagonal mask: two Loops built from configs/pretrain/mini_zh.yaml (packed rows, no dropout), one
per implementation, take turns on the same micro-batches, and the script reports the median of the per-step speed
ratios and, on CPU with an sdpa baseline, the share of its step spent in the sdpa backward kernel (profiler).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from berth.core.config import load_config
from berth.pretrain.config import PretrainConfig
from berth.pretrain.train import PretrainingStage
from berth.runtime.loop import Loop
from berth.tokenizer.train import ensure_tokenizer


def build(args: argparse.Namespace, attention: str) -> Loop:
    overrides = [
        f"model.architecture={args.architecture}",
        f"model.attn_implementation={attention}",
        f"train.batch_size={args.batch_size}",
        f"train.precision={args.precision}",
        "train.progress_bar=false",
        f"output_dir=runs/bench/attention-{attention}",
    ]
    cfg = load_config(PretrainConfig, "configs/pretrain/mini_zh.yaml", overrides)
    loop = Loop(cfg, PretrainingStage(cfg, lambda: ensure_tokenizer(cfg.tokenizer.path, cfg.tokenizer.config)))
    loop.build()
    return loop


def sdpa_backward_share(loop: Loop, data: list[dict]) -> float:
    """Share of self CPU time in the sdpa backward kernel over a few steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in data:
            loop.train_step([batch])
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    backward = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key and "backward" in e.key)
    return backward / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--architecture", default="modernbert", choices=["modernbert", "bert"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--baseline", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--against", default="eager", choices=["eager", "unpadded", "flex_attention"])
    args = parser.parse_args()
    base, other = args.baseline, args.against
    if base == other:
        parser.error(f"--baseline and --against are both {base}")
    loops = {name: build(args, name) for name in (base, other)}
    stream = (batch for step in loops[base].epoch_steps() for batch in step)
    data = [next(stream) for _ in range(args.steps + 3)]
    speed: dict[str, list[float]] = {name: [] for name in loops}
    for i, batch in enumerate(data):
        for name, loop in loops.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            loop.train_step([batch])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= 3:  # warm-up (FlexAttention compiles its kernels on the first steps)
                speed[name].append(1.0 / (time.perf_counter() - start))
    ratios = [o / b for o, b in zip(speed[other], speed[base], strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{args.architecture} mini, seq 128, batch {args.batch_size}, {args.precision}, {args.steps} steps, {device}")
    for name in loops:
        print(f"  {name:14s} {statistics.median(speed[name]):6.2f} steps/s")
    share = ""
    if base == "sdpa" and not torch.cuda.is_available():
        share = f"; sdpa backward kernel: {sdpa_backward_share(loops['sdpa'], data[:5]):.0%} of an sdpa step"
    print(
        f"  {other} / {base} {statistics.median(ratios):.2f}x (median of per-step ratios; quartiles "
        f"{quartiles[0]:.2f}-{quartiles[2]:.2f}){share}"
    )


if __name__ == "__main__":
    main()
