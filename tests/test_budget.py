"""train.budget_minutes: the step count fixed from timed steps, the schedule that follows it, and exact resume."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from test_pretrain_train import assert_same_weights, config, setup, weights  # noqa: F401

from berth.core.errors import BerthError
from berth.pretrain import train as pretrain_module
from berth.pretrain.config import PretrainConfig
from berth.pretrain.train import pretrain
from berth.runtime import budget as budget_module
from berth.runtime import loop as loop_module
from berth.runtime.budget import PROBE_SKIP, PROBE_STEPS, StepBudget
from berth.runtime.config import TrainConfig
from berth.runtime.schedules import lr_multiplier
from berth.runtime.tracking import read_metrics


def test_the_steps_that_fit_what_is_left_of_the_budget():
    budget = StepBudget(minutes=1, cap=1000, warmup=5)
    assert budget.fit(step=12, step_seconds=3.0, per_step=0.5, log=False) == 12 + 114  # (60 - 3) / 0.5
    assert StepBudget(minutes=1, cap=100, warmup=5).fit(12, 3.0, 0.5, log=False) == 100  # the cap
    with pytest.raises(BerthError, match=r"budget_minutes=0\.1 fits 13 optimizer steps .* fewer than the warm-up"):
        StepBudget(minutes=0.1, cap=1000, warmup=50).fit(12, 5.5, 0.5, log=False)


class Processes:
    """What StepBudget reads of an Accelerator: this process alone, or beside another whose figures are `other`
    (every figure is max-reduced across processes)."""

    device = torch.device("cpu")
    is_main_process = True

    def __init__(self, other: float | None = None):
        self.other = other

    def reduce(self, tensor, reduction):
        assert reduction == "max"
        return tensor if self.other is None else torch.maximum(tensor, torch.tensor([self.other]))


def test_the_count_is_fixed_once_from_the_probes_steps_and_the_slowest_process():
    budget = StepBudget(minutes=1, cap=10_000, warmup=0)
    seconds, fixed = 0.0, []
    for step in range(1, 30):
        seconds += 5.0 if step <= PROBE_SKIP else 0.1  # slow first steps are left out of the rate
        fixed.append(budget.observe(step, seconds, Processes(other=0.3)))  # the other took 0.3 s a step
    at_probe_end = PROBE_SKIP * 5.0 + (PROBE_STEPS - PROBE_SKIP) * 0.1
    assert [f for f in fixed if f] == [PROBE_STEPS + int((60 - at_probe_end) / 0.3)]
    assert [i + 1 for i, f in enumerate(fixed) if f] == [PROBE_STEPS]  # fixed once, after the probe's last step


@pytest.mark.parametrize(("warmup", "end"), [(0, PROBE_STEPS), (40, 40), (300, 300)])
def test_the_probe_times_the_warm_up_between_its_shortest_and_longest(warmup, end):
    """The probe runs to the end of the warm-up (whose LR does not depend on the count), at least PROBE_STEPS; its
    rate is the mean of every step after the first PROBE_SKIP."""

    budget = StepBudget(minutes=10, cap=100_000, warmup=warmup)
    seconds, fixed = 0.0, []
    for step in range(1, 400):
        seconds += 5.0 if step <= PROBE_SKIP else (0.125 if step % 2 else 0.375)  # two lengths in turn, exact in binary
        fixed.append(budget.observe(step, seconds, Processes()))
    assert [i + 1 for i, f in enumerate(fixed) if f] == [end]
    timed = [0.125 if step % 2 else 0.375 for step in range(PROBE_SKIP + 1, end + 1)]
    rate = sum(timed) / len(timed)
    left = 600 - (PROBE_SKIP * 5.0 + sum(timed))
    assert [f for f in fixed if f] == [end + int(left / rate)]


def test_a_run_resumed_inside_the_probe_times_the_steps_after_its_own_first():
    budget = StepBudget(minutes=10, cap=100_000, warmup=300)
    seconds, fixed = 100.0, []  # the time of the 50 steps before the checkpoint, slow ones included
    for step in range(51, 320):
        seconds += 4.0 if step == 51 else 0.25  # the resumed run's first step loads and draws
        fixed.append(budget.observe(step, seconds, Processes()))
    left = 600 - (100.0 + 4.0 + 249 * 0.25)
    assert [f for f in fixed if f] == [300 + int(left / 0.25)]


def test_settings_a_budget_cannot_use_are_refused():
    with pytest.raises(ValueError, match=r"warmup_ratio=0\.1 with budget_minutes"):
        TrainConfig(budget_minutes=5, warmup_ratio=0.1)
    with pytest.raises(ValueError, match="budget_minutes must be"):
        TrainConfig(budget_minutes=-1)
    from berth.pretrain.config import DataConfig, PretrainTrainConfig

    with pytest.raises(ValueError, match=r"mask_prob_end with train\.budget_minutes"):
        PretrainConfig(data=DataConfig(mask_prob_end=0.15, mask_prob=0.3), train=PretrainTrainConfig(budget_minutes=5))


class Clock:
    """perf_counter that advances 20 ms a call: every run sees the same step times."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 0.02
        return self.now


def use_clock(patch, perf_counter):
    """The loop's clock and the steps' (berth.runtime.budget.StepClock) read `perf_counter`."""
    fake = SimpleNamespace(perf_counter=perf_counter)
    patch.setattr(loop_module, "time", fake)
    patch.setattr(budget_module, "time", fake)


# 60 ms of the fake clock a step (read at its start, twice by its log line, at its end): some 45 steps
BUDGET = ["train.budget_minutes=0.045", "train.max_steps=500", "train.warmup_steps=4", "train.save_every=20"]
BUDGET += ["train.keep_checkpoints=10", "train.eval_every=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def budgeted(setup):  # noqa: F811
    with pytest.MonkeyPatch.context() as patch:
        use_clock(patch, Clock().perf_counter)
        final = pretrain(config(setup, "budget", *BUDGET))
    return final.parent


def test_a_budgeted_run_fixes_its_step_count_and_its_schedule_follows_it(budgeted):
    state = json.loads((sorted((budgeted / "checkpoints").glob("step-*"))[-1] / "state.json").read_text())
    total = state["planned_steps"]
    assert PROBE_STEPS < total < 500 and state["step"] == total
    logged = [m for m in read_metrics(budgeted) if "loss" in m]
    assert logged[-1]["step"] == total
    # the LR after step k is the one step k + 1 uses: linear warm-up over 4 steps, decay to 0 at the fixed count
    multiplier = lr_multiplier("linear", 4, total)
    for m in logged[PROBE_STEPS:]:
        assert m["lr"] == pytest.approx(1e-3 * multiplier(m["step"]), abs=1e-12), m["step"]
    assert state["step_seconds"] == pytest.approx(0.045 * 60, rel=0.05)  # the steps' time, by the fake clock


def test_a_resumed_budgeted_run_keeps_the_count_and_ends_with_the_same_weights(setup, budgeted):  # noqa: F811
    root, _ = setup
    resumed = root / "budget-resumed"
    shutil.copytree(budgeted, resumed)
    checkpoints = sorted((resumed / "checkpoints").glob("step-*"))
    assert len(checkpoints) >= 3
    for later in checkpoints[2:]:  # stopped after step 40: the rest of the run learns (LR above zero)
        shutil.rmtree(later)
    shutil.rmtree(resumed / "final")
    with pytest.MonkeyPatch.context() as patch:  # a resumed run does not time again: a clock 10x slower
        use_clock(patch, lambda: Clock().perf_counter() * 10)
        pretrain(config(setup, resumed.name, *BUDGET, "train.resume=auto"))
    logged = [m for m in read_metrics(resumed) if "loss" in m]
    # the LR logged after step k is the one step k + 1 uses: steps 41 to 44 learn (the last ends the decay at 0)
    assert [m["step"] for m in logged[39:43]] == [40, 41, 42, 43] and all(m["lr"] > 0 for m in logged[39:43])
    assert_same_weights(weights(budgeted), weights(resumed))


def test_evaluations_and_checkpoints_are_left_out_of_the_logged_rates(setup):  # noqa: F811
    """Each evaluation and each checkpoint takes 100 s of the fake clock between two log lines: the rates of the
    line after it (tokens_per_s, and the stage's fields from the same seconds) count the steps alone."""
    clock, evaluate, save = Clock(), pretrain_module.evaluate, loop_module.save_checkpoint

    def slow(work):
        def run(*args, **kwargs):
            clock.now += 100.0
            return work(*args, **kwargs)

        return run

    with pytest.MonkeyPatch.context() as patch:
        use_clock(patch, clock.perf_counter)
        patch.setattr(pretrain_module, "evaluate", slow(evaluate))
        patch.setattr(loop_module, "save_checkpoint", slow(save))
        args = ["train.max_steps=12", "train.warmup_steps=2", "train.eval_every=4", "train.save_every=6"]
        final = pretrain(config(setup, "rates", *args, "train.log_every=2", "train.keep_checkpoints=10"))
    metrics = read_metrics(final.parent)
    logged = [m for m in metrics if "tokens_per_s" in m]
    assert [m["step"] for m in metrics if "eval_mlm_loss" in m] == [4, 8, 12]
    # the evaluations after steps 4 and 8 and the checkpoint after step 6 fall inside the lines of steps 6, 8 and 10
    assert logged[-1]["time"] > 3 * 100
    rates = [m["tokens_per_s"] for m in logged]
    assert len(rates) == 6
    # Lines 2-6 each count two steps of the fake clock (the first line, one and a half); those after a pause are
    # as fast as the others, where one that counted a 100 s pause would be 1,000 times slower.
    assert min(rates[1:]) > 0.8 * max(rates[1:]), rates
    state = json.loads((sorted((final.parent / "checkpoints").glob("step-*"))[-1] / "state.json").read_text())
    assert state["step"] == 12 and state["step_seconds"] < 100  # nor are they the budget's time


@pytest.mark.slow
def test_two_processes_of_unequal_clocks_fix_one_count_and_end_together(setup, tmp_path):  # noqa: F811
    """Launched on 2 processes whose clocks differ (the second's runs 1.5x fast: tests/budget_ranks.py), each
    times its own steps; both take the slowest rate, plan the same count, run it and end. A process planning its
    own count would stop while the other waits in a collective."""
    from conftest import launch_two_processes

    _, base = setup
    run = tmp_path / "run"
    args = ["configs/pretrain/mini_zh.yaml", *base, f"output_dir={run}", "train.budget_minutes=0.25"]
    args += ["train.max_steps=100000", "train.warmup_steps=4", "train.eval_every=0", "train.save_every=100000"]
    result = launch_two_processes("tests/budget_ranks.py", args, script=True)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [x for x in result.stderr.splitlines() if "the schedule follows" in x]  # logged once, by the main one
    total = int(line.rsplit("follows ", 1)[1].split()[0])
    state = json.loads((sorted((run / "checkpoints").glob("step-*"))[-1] / "state.json").read_text())
    assert state["planned_steps"] == state["step"] == total > PROBE_STEPS
    assert "2 processes" in result.stderr
