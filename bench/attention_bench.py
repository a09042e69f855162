"""sdpa against eager attention in berth's pretraining step, on the same batches, interleaved in one run.

    .venv/bin/python bench/attention_bench.py [--architecture modernbert|bert] [--steps 30] [--batch-size 32]

Backs `model.attn_implementation: auto` (eager when training on CPU without attention dropout): two Loops
built from configs/pretrain/mini_zh.yaml (no dropout), one per attention implementation, take turns on the
same micro-batches, and the script reports the median of the per-step speed ratios and, from the profiler,
the share of an sdpa step spent in the sdpa backward kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time

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
    args = parser.parse_args()
    loops = {name: build(args, name) for name in ("sdpa", "eager")}
    stream = (batch for step in loops["sdpa"].epoch_steps() for batch in step)
    data = [next(stream) for _ in range(args.steps + 3)]
    speed: dict[str, list[float]] = {name: [] for name in loops}
    for i, batch in enumerate(data):
        for name, loop in loops.items():
            start = time.perf_counter()
            loop.train_step([batch])
            if i >= 3:  # warm-up
                speed[name].append(1.0 / (time.perf_counter() - start))
    ratios = [e / s for e, s in zip(speed["eager"], speed["sdpa"], strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    share = sdpa_backward_share(loops["sdpa"], data[:5])
    print(f"{args.architecture} mini, seq 128, batch {args.batch_size}, {args.precision}, {args.steps} steps")
    for name in loops:
        print(f"  {name:5s} {statistics.median(speed[name]):5.2f} steps/s")
    print(
        f"  eager / sdpa {statistics.median(ratios):.2f}x (median of per-step ratios; quartiles "
        f"{quartiles[0]:.2f}-{quartiles[2]:.2f}); sdpa backward kernel: {share:.0%} of an sdpa step"
    )


if __name__ == "__main__":
    main()
