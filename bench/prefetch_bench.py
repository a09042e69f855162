"""Benchmark of the data path off the training thread, and of each rank's share of the drawing work.

    .venv/bin/python bench/prefetch_bench.py [--batch-size 128] [--steps 40] [--sleep-factor 2.5]

1. The CPU cost of one step's batches: drawing the examples (`EpochStream`), masking and collating, as the
   pretraining stage produces them for `berth pretrain` (configs/pretrain/mini_zh.yaml, the embedded corpus).
2. A stand-in training step that sleeps a fixed time (`--sleep-factor` x that cost; the accelerator's share of a
   step), fed by the loop's own `steps()`: with `train.prefetch=0` (batches made in the step) and with the
   default prefetch (made in a thread ahead). Reported: the step rate as a share of the sleep-only rate (1.0: the
   data work is entirely hidden behind the step; the target is >= 0.95).
3. The drawing and collating work of rank 0 at simulated world sizes 1, 2, 4 and 8 with the same global batch
   (each rank's `epoch_steps` for the same optimizer steps), relative to one process: its seconds, and the
   examples it builds and the recipes it draws (counted, so free of machine noise). One process draws every recipe
   of the documents it reaches; a rank of several draws each of its documents up to the last recipe it takes.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace

import torch

from berth.core.config import load_config
from berth.pretrain.config import PretrainConfig
from berth.pretrain.data import ExampleBuilder, Recipe
from berth.pretrain.train import PretrainingStage
from berth.runtime.loop import Loop
from berth.runtime.prefetch import PREFETCH_AUTO
from berth.tokenizer.train import ensure_tokenizer


def build(batch_size: int, prefetch: int) -> Loop:
    overrides = [f"train.batch_size={batch_size}", f"train.prefetch={prefetch}", "train.progress_bar=false"]
    cfg = load_config(PretrainConfig, "configs/pretrain/mini_zh.yaml", overrides)
    stage = PretrainingStage(cfg, lambda: ensure_tokenizer(cfg.tokenizer.path, cfg.tokenizer.config))
    loop = Loop(cfg, stage)
    loop.build()
    return loop


def timed_steps(loop: Loop, steps: int, sleep: float, skip: int) -> float:
    """Seconds for `steps` steps of a stand-in that sleeps `sleep` each, fed by the loop's steps() from `skip`."""
    loop.state.epoch_step = skip
    with loop.steps() as batches:
        iterator = iter(batches)
        next(iterator)  # the thread's start-up and first chunk are not a step's
        start = time.perf_counter()
        for _ in range(steps):
            next(iterator)
            time.sleep(sleep)
        return time.perf_counter() - start


def rank_cost(stage: PretrainingStage, processes: int, global_batch: int, steps: int, skip: int) -> float:
    """Seconds rank 0 of `processes` spends making its micro-batches of `steps` steps (same global batch)."""
    rank0 = SimpleNamespace(
        process_index=0, num_processes=processes, is_main_process=True, main_process_first=contextlib.nullcontext
    )
    stage.cfg = replace(stage.cfg, train=replace(stage.cfg.train, batch_size=global_batch // processes))
    start = time.perf_counter()
    for k, _ in enumerate(stage.epoch_steps(0, skip, global_batch, rank0)):  # type: ignore[arg-type]
        if k + 1 == steps:
            break
    return time.perf_counter() - start


@contextlib.contextmanager
def counting() -> Iterator[dict[str, int]]:
    """Counts the examples built, the recipes drawn, and the recipes of the documents drawn (what drawing each
    document whole would draw) while it is open."""
    counts = {"examples": 0, "recipes": 0, "whole": 0}
    example, recipe_stream = ExampleBuilder.example, ExampleBuilder.recipe_stream

    def counted_example(self: ExampleBuilder, recipe: Recipe) -> dict:
        counts["examples"] += 1
        return example(self, recipe)

    def counted_stream(self: ExampleBuilder, index: int) -> Iterator[Recipe]:
        counts["whole"] += sum(1 for _ in recipe_stream(self, index))
        for recipe in recipe_stream(self, index):
            counts["recipes"] += 1
            yield recipe

    ExampleBuilder.example, ExampleBuilder.recipe_stream = counted_example, counted_stream  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        ExampleBuilder.example, ExampleBuilder.recipe_stream = example, recipe_stream  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sleep-factor", type=float, default=2.5)
    parser.add_argument(
        "--prefetch", type=int, default=0, help="train.prefetch of the second run (default: what auto takes on GPUs)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)

    inline = build(args.batch_size, 0)
    depth = args.prefetch or PREFETCH_AUTO
    ahead = build(args.batch_size, depth)
    stage = inline.stage
    assert isinstance(stage, PretrainingStage)
    # 1. the CPU cost of a step's batches, over the same steps the runs below take (chunks drawn included)
    costs = []
    for _ in range(3):
        start = time.perf_counter()
        for k, _ in enumerate(inline.epoch_steps()):
            if k + 1 == args.steps:
                break
        costs.append((time.perf_counter() - start) / args.steps)
    cost = statistics.median(costs)
    sleep = args.sleep_factor * cost
    print(f"batch CPU cost: {cost * 1000:.1f} ms a step (batch {args.batch_size}, median of 3 x {args.steps} steps)")
    print(f"stand-in step: sleeps {sleep * 1000:.1f} ms ({args.sleep_factor}x the batch cost)")

    # 2. the stand-in's step rate, both ways interleaved (machine noise hits both), as a share of sleep alone
    shares: dict[str, list[float]] = {"train.prefetch=0": [], f"train.prefetch={depth}": []}
    for repeat in range(3):
        for name, loop in (("train.prefetch=0", inline), (f"train.prefetch={depth}", ahead)):
            seconds = timed_steps(loop, args.steps, sleep, skip=repeat * (args.steps + 1))
            shares[name].append(args.steps * sleep / seconds)
    print("\n| data path | step rate / sleep-only rate (median of 3) | runs |")
    print("|---|---|---|")
    for name, values in shares.items():
        print(f"| {name} | {statistics.median(values):.3f} | {', '.join(f'{v:.3f}' for v in values)} |")

    # 3. rank 0's work at simulated world sizes, the global batch fixed
    global_batch = args.batch_size
    print(
        f"\n| processes | rank 0's batch work for {args.steps} steps (s) | relative to 1 | examples built | "
        "recipes drawn (relative to 1) | recipes of the documents drawn |"
    )
    print("|---|---|---|---|---|---|")
    base, base_recipes = 0.0, 0
    for processes in (1, 2, 4, 8):
        seconds = statistics.median(rank_cost(stage, processes, global_batch, args.steps, skip=0) for _ in range(3))
        with counting() as counts:
            rank_cost(stage, processes, global_batch, args.steps, skip=0)
        base, base_recipes = base or seconds, base_recipes or counts["recipes"]
        print(
            f"| {processes} | {seconds:.2f} | {seconds / base:.2f} | {counts['examples']} | {counts['recipes']} "
            f"({counts['recipes'] / base_recipes:.3f}) | {counts['whole']} |"
        )


if __name__ == "__main__":
    main()
