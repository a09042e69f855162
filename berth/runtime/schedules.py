"""Learning-rate warm-up and decay, as multipliers of the peak LR, counted in optimizer steps.

Optimizer steps, not micro-batches or process-steps: the schedule is the same whatever the number of
processes and the gradient accumulation (Accelerate's prepared schedulers step once per process unless told
otherwise, which stretches or squeezes warm-up when the process count changes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

SCHEDULES = ("linear", "cosine", "constant", "noam", "wsd")
# Schedules whose LR after the warm-up does not depend on the step count: a refit changes where they stop, nothing else.
COUNT_FREE = ("constant", "noam")
# wsd: the share of the run, at its end, over which the LR decays (MiniCPM and Hagele et al. 2024 use 10-20%).
DECAY_FRACTION = 0.2


def lr_multiplier(
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.0,
    decay_fraction: float = DECAY_FRACTION,
    refits: Sequence[tuple[int, int]] = (),
) -> Callable[[int], float]:
    """step -> multiplier of the peak LR. Step 0 is the first optimizer step.

    linear (BERT): linear warm-up, then linear decay to min_ratio at total_steps.
    cosine: linear warm-up, then half a cosine down to min_ratio.
    constant: linear warm-up, then flat.
    noam (inverse square root, "Attention is all you need"): linear warm-up, then sqrt(warmup / step).
    wsd (warm-up, stable, decay): linear warm-up, flat at the peak, then linear decay to min_ratio over the last
        decay_fraction of the steps (never into the warm-up): a run's weights before the decay can be continued.

    refits: (after step, new count) pairs, in order, of a count fitted again during the run (train.budget_minutes):
    after each, the rest of the schedule then in force is stretched or squeezed onto the new count. The LR runs on
    from where it was (no jump) and still reaches its end (min_ratio for a decay) at the last step.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    warmup = max(0, warmup_steps)

    def multiplier(step: float) -> float:
        done = step + 1  # the LR used for the (step + 1)-th update; fractional for a refitted schedule
        if done <= warmup:
            return done / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "noam":
            return math.sqrt(max(warmup, 1) / done)
        if schedule == "wsd":
            decay = max(1, round(decay_fraction * total_steps))
            start = max(warmup, total_steps - decay)
            if done <= start:
                return 1.0
            progress = min(1.0, (done - start) / max(1, total_steps - start))
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        progress = min(1.0, (done - warmup) / max(1, total_steps - warmup))
        if schedule == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    if not refits or schedule in COUNT_FREE:
        return multiplier
    totals = [total_steps, *(total for _, total in refits)]

    def refitted(step: int) -> float:
        # The (step + 1)-th update, carried back through each refit, latest first, to the plan before it: refit i
        # maps updates (after, count_i] linearly onto (after, count_(i-1)].
        done: float = step + 1
        for i in range(len(refits) - 1, -1, -1):
            after, count = refits[i]
            if done > after:
                done = after + (done - after) * (totals[i] - after) / max(1, count - after)
        return multiplier(done - 1)  # a fractional step: every branch is continuous in it

    return refitted


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.0,
    decay_fraction: float = DECAY_FRACTION,
    start: int = 0,
    refits: Sequence[tuple[int, int]] = (),
) -> torch.optim.lr_scheduler.LambdaLR:
    """`start`: the optimizer steps already taken, for a schedule that takes over from another on the same optimizer
    (its LR is set for step `start` at once). `refits`: as for lr_multiplier."""
    multiplier = lr_multiplier(schedule, warmup_steps, total_steps, min_ratio, decay_fraction, refits)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier, last_epoch=start - 1)


def planned_curve(
    peak_lr: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.0,
    decay_fraction: float = DECAY_FRACTION,
    points: int = 11,
) -> list[tuple[int, float]]:
    """(step, lr) at evenly spaced steps, warm-up end included: what the run will do, logged at start."""
    f = lr_multiplier(schedule, warmup_steps, total_steps, min_ratio, decay_fraction)
    steps = sorted({0, max(0, warmup_steps - 1), *(round(i * (total_steps - 1) / (points - 1)) for i in range(points))})
    return [(s, peak_lr * f(s)) for s in steps if s < total_steps]
