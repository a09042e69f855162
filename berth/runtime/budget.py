"""`train.budget_minutes`: a run sized by time rather than by steps (academic-budget-bert's budgets).

The run times its first optimizer steps (the warm-up's, at least 12), fixes the step count that
fits the budget and keeps it in the run's state: the learning-rate schedule (warm-up and decay) follows that count
from then on, every process takes the same count (the slowest process's timing), and a resumed run reads it back
instead of timing again. The budget covers the optimizer steps (their batches, forward, backward and update);
held-out evaluations and checkpoints come on top and are logged apart.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from accelerate import Accelerator

from berth.core.errors import BerthError

logger = logging.getLogger(__name__)

# The first steps allocate memory and draw the first chunk of examples: timed, but not used for the rate.
PROBE_SKIP = 2
# The step after which the count is fixed, at the least: until then the schedule assumes the run's cap. With a
# longer warm-up the probe runs to its end: the LR of warm-up steps does not depend on the count, and on the 2-core
# CPU ten timed steps were off by up to 5%, and a run whose steps slowed by a quarter after step 110 by 19%.
PROBE_STEPS = 12


class StepClock:
    """The wall time of the optimizer steps alone: evaluations and checkpoints come between steps and are left
    out, so the budget's `step_seconds` and the log's rates (tokens_per_s, mfu) count the same time."""

    def __init__(self) -> None:
        self.started: float | None = None  # when the step in progress began; None between steps
        self.since = 0.0  # the step in progress is counted in laps from here
        self.window = 0.0  # the finished steps' seconds not yet in a lap

    def start(self) -> None:
        """A step begins. Of a step left running (one that never stopped), what no lap counted is dropped: the
        loop starts again after an evaluation at an epoch's end without a step in between."""
        self.started = self.since = time.perf_counter()

    def stop(self) -> float:
        """End the step in progress; its seconds."""
        if self.started is None:
            raise RuntimeError("StepClock.stop without start")
        now = time.perf_counter()
        spent, self.window = now - self.started, self.window + now - self.since
        self.started = None
        return spent

    def lap(self) -> float:
        """The steps' seconds since the last lap. A lap inside a step counts the step up to now: its log line
        waits there for the device, and that wait is the step's."""
        seconds, self.window = self.window, 0.0
        if self.started is not None:
            now = time.perf_counter()
            seconds, self.since = seconds + now - self.since, now
        return seconds


class StepBudget:
    """The optimizer steps a run of `minutes` takes, fixed from the time of steps PROBE_SKIP + 1 .. probe_end:
    the warm-up's last step, or PROBE_STEPS for a shorter warm-up."""

    def __init__(self, minutes: float, cap: int, warmup: int):
        self.seconds = minutes * 60
        self.cap = cap  # train.max_steps, or the steps of train.epochs
        self.warmup = warmup
        self.probe_end = max(PROBE_STEPS, warmup)
        # (step, step seconds) after which the probe's rate is timed: PROBE_SKIP, or a resumed run's own first step
        self.skipped: tuple[int, float] | None = None

    def observe(self, step: int, step_seconds: float, acc: Accelerator) -> int:
        """After optimizer step `step` (1-based), with the run's step seconds so far: the run's step count when it
        is fixed now, else 0. At the fix every process must call it (the timing is agreed in a collective)."""
        if self.skipped is None and step >= PROBE_SKIP:
            # a run resumed inside the probe leaves out its own first step (loading, its first chunk) as well
            self.skipped = (step, step_seconds)
        if step != self.probe_end:
            return 0
        after, at = self.skipped or (0, 0.0)
        timed = step - after
        rate = (step_seconds - at) / timed if timed else step_seconds / step
        # every process fits the count from the same figures, the slowest process's: each times its own steps, and
        # counts fitted from figures a few ms apart can differ by one, which leaves a process waiting forever
        agreed = acc.reduce(torch.tensor([rate, step_seconds], device=acc.device), reduction="max")
        return self.fit(step, float(agreed[1]), float(agreed[0]), acc.is_main_process)

    def fit(self, step: int, step_seconds: float, per_step: float, log: bool = True) -> int:
        """The step count whose remaining steps at `per_step` seconds fill what is left of the budget."""
        fits = step + math.floor(max(0.0, self.seconds - step_seconds) / max(per_step, 1e-9))
        total = min(fits, self.cap)
        if total < max(self.warmup, step):
            raise BerthError(
                f"train.budget_minutes={self.seconds / 60:g} fits {fits} optimizer steps at {per_step:.3f} s each, "
                f"fewer than the warm-up ({self.warmup}) or the steps timed ({step}); raise the budget"
            )
        if log:
            capped = f", capped at {self.cap} (train.max_steps or train.epochs)" if fits > self.cap else ""
            logger.info(
                "budget %g min: %.3f s an optimizer step, %d steps fit%s; the schedule follows %d steps",
                self.seconds / 60,
                per_step,
                fits,
                capped,
                total,
            )
        return total
