"""`train.budget_minutes`: a run sized by time rather than by steps (academic-budget-bert's budgets).

The run times its first optimizer steps (the warm-up's, at least 12), fixes the step count that
fits the budget and keeps it in the run's state: the learning-rate schedule (warm-up and decay) follows that count
from then on, every process takes the same count (the slowest process's timing), and a resumed run reads it back
instead of timing again. Step times drift after the probe (on a shared 2-core CPU by 10-20%), so the count is
fitted again at REFIT_AT of the budget's time, from the steps since the previous fit; the schedule's rest is
stretched onto the new count, with no jump in the LR. The budget covers the optimizer steps (their batches,
forward, backward and update); held-out evaluations and checkpoints come on top and are logged apart.
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
# Shares of the budget's time after which the count is fitted again. The last leaves 5% of it to drift unseen.
REFIT_AT = (0.5, 0.8, 0.95)


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
        # (step, this process's step seconds) from which the next fit's rate is timed: PROBE_SKIP, a resumed run's
        # own first step (loading, its first chunk), then each fit. Each process times its own steps; only the
        # rates are agreed, so this stays in memory.
        self.mark: tuple[int, float] | None = None

    def observe(self, step: int, step_seconds: float, fits: list[list[float]], acc: Accelerator) -> list[float]:
        """After optimizer step `step` (1-based), with this process's step seconds so far and the run's fits so far
        ([step, count, step seconds] each, the probe's first): a new fit when one is due now, else []. At a fit every
        process must call it (the timing is agreed in a collective); `fits` is the same on every process."""
        if self.mark is None and step >= PROBE_SKIP:
            self.mark = (step, step_seconds)
        if step != (self.refit_step(fits) if fits else self.probe_end):
            return []
        after, at = self.mark or (0, 0.0)
        rate = (step_seconds - at) / (step - after) if step > after else step_seconds / step
        self.mark = (step, step_seconds)
        # every process fits the count from the same figures, the slowest process's: each times its own steps, and
        # counts fitted from figures a few ms apart can differ by one, which leaves a process waiting forever
        agreed = acc.reduce(torch.tensor([rate, step_seconds], device=acc.device), reduction="max")
        rate, step_seconds = float(agreed[0]), float(agreed[1])
        if fits:
            count = self.refit(step, step_seconds, rate, int(fits[-1][1]), acc.is_main_process)
        else:
            count = self.fit(step, step_seconds, rate, acc.is_main_process)
        return [step, count, round(step_seconds, 3)]

    def steps_that_fit(self, step: int, step_seconds: float, per_step: float) -> int:
        """`step` and the steps at `per_step` seconds that fill what is left of the budget (no cap)."""
        return step + math.floor(max(0.0, self.seconds - step_seconds) / max(per_step, 1e-9))

    def refit_step(self, fits: list[list[float]]) -> int:
        """The step after which the count is fitted again: where the last fit's figures put the next REFIT_AT share
        of the budget's time; 0 for none. A share of time, not of steps: when a fit cuts the count by a third, the
        next is still some way off. Each share is aimed at once, and a share the steps passed before their fit is
        skipped: steps that speed up reach a fit before its share's time, and must not fit again for it."""
        share = 0.0  # after each fit in turn: the share the fit after it aims at (1.0: none left)
        for fit in fits:
            share = next((s for s in REFIT_AT if s > share and s * self.seconds > fit[2]), 1.0)
        if share == 1.0:
            return 0
        after, count, spent = int(fits[-1][0]), int(fits[-1][1]), fits[-1][2]
        until = share * self.seconds - spent  # seconds from the last fit to that share
        at = after + max(1, math.ceil((count - after) * until / (self.seconds - spent)))
        return at if at < count else 0

    def refit(self, step: int, step_seconds: float, per_step: float, count: int, log: bool = True) -> int:
        """The count fitted again after `step`: what is left of the budget at the recent `per_step`. No fewer than
        the steps done: a run already past its budget ends here."""
        total = max(step, min(self.steps_that_fit(step, step_seconds, per_step), self.cap))
        if log:
            logger.info(
                "budget %g min: after step %d, %.1f s spent, %.3f s an optimizer step since the last fit; "
                "the schedule's rest is fitted to %d steps (was %d)",
                self.seconds / 60,
                step,
                step_seconds,
                per_step,
                total,
                count,
            )
        return total

    def fit(self, step: int, step_seconds: float, per_step: float, log: bool = True) -> int:
        """The step count whose remaining steps at `per_step` seconds fill what is left of the budget."""
        fits = self.steps_that_fit(step, step_seconds, per_step)
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


def planned_counts(fits: list[list[float]], planned_steps: int) -> tuple[int, int, list[tuple[int, int]]]:
    """A state's budget fits as the schedule takes them: (the first count, the count in force, the later fits as
    (after step, count)). A state saved before later fits were kept holds `planned_steps` alone."""
    if not fits:
        return planned_steps, planned_steps, []
    return int(fits[0][1]), int(fits[-1][1]), [(int(after), int(count)) for after, count, _ in fits[1:]]
