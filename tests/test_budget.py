"""train.budget_minutes: the step count fixed from timed steps, the schedule that follows it, and exact resume."""

import itertools
import json
import math
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
from berth.runtime.budget import PROBE_SKIP, PROBE_STEPS, REFIT_AT, StepBudget
from berth.runtime.checkpoint import list_checkpoints
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
    """What StepBudget reads of an Accelerator: this process alone, or beside another whose steps take `slower`
    times as long (every figure is max-reduced across processes)."""

    device = torch.device("cpu")
    is_main_process = True

    def __init__(self, slower: float = 1.0):
        self.slower = slower

    def reduce(self, tensor, reduction):
        assert reduction == "max"
        return torch.maximum(tensor, tensor * self.slower)


def test_the_count_is_fixed_once_from_the_probes_steps_and_the_slowest_process():
    budget = StepBudget(minutes=1, cap=10_000, warmup=0)
    seconds, fits = 0.0, []
    for step in range(1, 30):
        seconds += 5.0 if step <= PROBE_SKIP else 0.125  # slow first steps are left out of the rate
        fits += [budget.observe(step, seconds, [f for f in fits if f], Processes(slower=2))]
    # the other process's figures: 22.5 s spent at the probe's end, 0.25 s a step, 150 steps in the 37.5 s left
    assert [f for f in fits if f] == [[PROBE_STEPS, PROBE_STEPS + 150, 22.5]]
    assert [i + 1 for i, f in enumerate(fits) if f] == [PROBE_STEPS]  # fixed once, after the probe's last step


@pytest.mark.parametrize(("warmup", "end"), [(0, PROBE_STEPS), (40, 40), (300, 300)])
def test_the_probe_times_the_warm_up_between_its_shortest_and_longest(warmup, end):
    """The probe runs to the end of the warm-up (whose LR does not depend on the count), at least PROBE_STEPS; its
    rate is the mean of every step after the first PROBE_SKIP."""

    budget = StepBudget(minutes=10, cap=100_000, warmup=warmup)
    seconds, fits = 0.0, []
    for step in range(1, 400):
        seconds += 5.0 if step <= PROBE_SKIP else (0.125 if step % 2 else 0.375)  # two lengths in turn, exact in binary
        fits += [budget.observe(step, seconds, [f for f in fits if f], Processes())]
    assert [i + 1 for i, f in enumerate(fits) if f] == [end]
    timed = [0.125 if step % 2 else 0.375 for step in range(PROBE_SKIP + 1, end + 1)]
    rate = sum(timed) / len(timed)
    left = 600 - (PROBE_SKIP * 5.0 + sum(timed))
    assert [f[1] for f in fits if f] == [end + int(left / rate)]


def test_a_run_resumed_inside_the_probe_times_the_steps_after_its_own_first():
    budget = StepBudget(minutes=10, cap=100_000, warmup=300)
    seconds, fits = 100.0, []  # the time of the 50 steps before the checkpoint, slow ones included
    for step in range(51, 320):
        seconds += 4.0 if step == 51 else 0.25  # the resumed run's first step loads and draws
        fits += [budget.observe(step, seconds, [f for f in fits if f], Processes())]
    left = 600 - (100.0 + 4.0 + 249 * 0.25)
    assert [f[1] for f in fits if f] == [300 + int(left / 0.25)]


def spend(budget, step_time, acc):
    """Run a budget's steps as the loop does (step `step` takes `step_time(step)` seconds) until the count in force:
    the fits made, and the seconds spent."""
    seconds, fits, step = 0.0, [], 0
    while step < (fits[-1][1] if fits else budget.cap):
        step += 1
        seconds += step_time(step)
        fit = budget.observe(step, seconds, fits, acc)
        fits += [fit] if fit else []
    return fits, seconds


def test_the_count_is_fitted_again_from_the_steps_since_the_last_fit():
    """Steps slow from 1/8 s to 5/32 s after step 100, after the probe: the probe's count would overrun the minute
    by 19.8%; fitted again where half, 80% and 95% of the minute fall by the fit before, from the steps since it,
    the run spends the minute to within a step."""
    slows = lambda step: 0.125 if step <= 100 else 0.15625  # noqa: E731  # exact in binary
    fits, seconds = spend(StepBudget(minutes=1, cap=100_000, warmup=0), slows, Processes())
    # the probe: 12 steps of 1/8 s, and 58.5 s left at 1/8 s a step
    assert fits[0] == [PROBE_STEPS, 480, 1.5]
    # after step 240: 12.5 + 140 x 5/32 s = 34.375 s spent; 5/32 s a step since step 12 for the 140 after 100,
    # 1/8 s for 88 before: (34.375 - 1.5) / 228 a step over the 25.625 s left
    rate = (34.375 - 1.5) / 228
    assert fits[1] == [240, 240 + int(25.625 / rate), 34.375]
    # the next where that fit puts 80% of the minute (48 s); from then on the rate since the fit before is the steps'
    # own, and the last fit comes right after the step that reaches 95% (57 s)
    assert len(fits) == 4 and fits[2][0] == 240 + math.ceil((fits[1][1] - 240) * (48 - 34.375) / (60 - 34.375))
    assert 57 <= fits[3][2] < 57 + 0.15625
    assert 60 - 0.15625 < seconds <= 60  # within a step of the budget
    assert 12.5 + (480 - 100) * 0.15625 > 1.15 * 60  # where the probe's count alone would have ended


def test_refits_fall_where_the_last_fit_puts_the_next_share_of_the_budgets_time():
    budget = StepBudget(minutes=1, cap=1000, warmup=0)
    assert budget.refit_step([[12, 480, 1.5]]) == 240  # half the minute: 28.5 of the 58.5 s left, 228 of 468 steps
    # 80% of the minute: 8 of the 20 s left, so 40 of the 100 steps left; not 80% of the count (step 160)
    assert budget.refit_step([[12, 480, 1.5], [100, 200, 40.0]]) == 140
    assert budget.refit_step([[100, 120, 47.5]]) == 101  # a fit just short of a share: the next step, not none
    assert budget.refit_step([[100, 200, 58.0]]) == 0  # past 95%: no more
    # steps that sped up reached the fit aimed at 80% (48 s; the one before, at 50%) at 45 s: the next is aimed at
    # 95% (57 s, 12 of the 15 s left), not at 80% again (3 s on)
    assert budget.refit_step([[12, 480, 1.5], [240, 400, 30.0], [300, 400, 45.0]]) == 300 + math.ceil(100 * 12 / 15)
    assert budget.refit_step([[100, 101, 56.0]]) == 0  # the run ends before 95% of the minute


def test_steps_that_speed_up_are_fitted_again_once_a_share():
    """Steps twice as fast after step 100: each fit comes before its share's time, and the next aims at the next
    share; the run still spends the minute to within a step."""
    fits, seconds = spend(
        StepBudget(minutes=1, cap=100_000, warmup=0), lambda s: 0.25 if s <= 100 else 0.125, Processes()
    )
    assert len(fits) == 1 + len(REFIT_AT) and 60 - 0.125 < seconds <= 60


def test_the_slowest_process_sets_every_fit_and_a_spent_budget_ends_the_run():
    # the other process's steps take 0.5 s to this one's 0.125, and every fit follows its clock
    fits, _ = spend(StepBudget(minutes=1, cap=100_000, warmup=0), lambda step: 0.125, Processes(slower=4))
    assert fits == [[PROBE_STEPS, 120, 6.0], [60, 120, 30.0], [96, 120, 48.0], [114, 120, 57.0]]
    # a run past its budget at a fit ends there, as late as it already is
    assert StepBudget(minutes=1, cap=1000, warmup=0).refit(300, 75.0, per_step=0.25, count=400, log=False) == 300


def test_settings_a_budget_cannot_use_are_refused():
    with pytest.raises(ValueError, match=r"warmup_ratio=0\.1 with budget_minutes"):
        TrainConfig(budget_minutes=5, warmup_ratio=0.1)
    with pytest.raises(ValueError, match="budget_minutes must be"):
        TrainConfig(budget_minutes=-1)
    from berth.pretrain.config import DataConfig, PretrainTrainConfig

    with pytest.raises(ValueError, match=r"mask_prob_end with train\.budget_minutes"):
        PretrainConfig(data=DataConfig(mask_prob_end=0.15, mask_prob=0.3), train=PretrainTrainConfig(budget_minutes=5))


class Clock:
    """perf_counter that advances `tick` (20 ms) a call: every run sees the same step times."""

    def __init__(self):
        self.now, self.tick = 0.0, 0.02

    def perf_counter(self):
        self.now += self.tick
        return self.now


def use_clock(patch, perf_counter):
    """The loop's clock and the steps' (berth.runtime.budget.StepClock) read `perf_counter`."""
    fake = SimpleNamespace(perf_counter=perf_counter)
    patch.setattr(loop_module, "time", fake)
    patch.setattr(budget_module, "time", fake)


def slowing(patch, clock, after=20):
    """Steps after `after` take 1.5x as long on `clock`, in any run that reaches them (resumed or not)."""
    step = loop_module.Loop.train_step

    def timed(loop, micro_batches):
        clock.tick = 0.03 if loop.state.step >= after else 0.02
        return step(loop, micro_batches)

    patch.setattr(loop_module.Loop, "train_step", timed)


# 60 ms of the fake clock a step (read at its start, twice by its log line, at its end), 90 ms after step 20: the
# probe's count (some 45 steps) would overrun the budget by over a quarter
BUDGET = ["train.budget_minutes=0.045", "train.max_steps=500", "train.warmup_steps=4", "train.save_every=10"]
BUDGET += ["train.keep_checkpoints=10", "train.eval_every=0", "train.log_every=1"]


def budgeted_run(setup, name, *args):  # noqa: F811
    with pytest.MonkeyPatch.context() as patch:
        clock = Clock()
        use_clock(patch, clock.perf_counter)
        slowing(patch, clock)
        return pretrain(config(setup, name, *BUDGET, *args)).parent


def last_state(run):
    return json.loads((list_checkpoints(run)[-1] / "state.json").read_text())


@pytest.fixture(scope="module")
def budgeted(setup):  # noqa: F811
    return budgeted_run(setup, "budget")


def test_a_budgeted_run_fits_its_count_again_as_its_steps_slow(budgeted):
    state = last_state(budgeted)
    fits, total = state["fits"], state["planned_steps"]
    # refitted first where the probe's figures put half the budget's time: (0.5 x 2.7 s - spent) / the rate since
    first, spent = fits[0][1], fits[0][2]
    assert [f[0] for f in fits[:2]] == [PROBE_STEPS, 12 + math.ceil((first - 12) * (1.35 - spent) / (2.7 - spent))]
    assert len(fits) >= 3
    assert PROBE_STEPS < total == fits[-1][1] == state["step"] < fits[0][1] - 5  # the count came down
    assert state["step_seconds"] == pytest.approx(0.045 * 60, rel=0.05)  # the steps' time, by the fake clock
    logged = [m for m in read_metrics(budgeted) if "loss" in m]
    assert logged[-1]["step"] == total
    # the LR after step k is the one step k + 1 uses: linear warm-up over 4 steps, decay planned on the first count
    # and refitted to each later one (tests/test_runtime.py checks the refits by hand); it never rises, and ends at 0.
    # A fit's own step is logged before the fit (the step's time includes its log line), with the LR planned before.
    multiplier = lr_multiplier("linear", 4, fits[0][1], refits=[(f[0], f[1]) for f in fits[1:]])
    at_fits = {f[0] for f in fits}
    for m in logged[PROBE_STEPS:]:
        if m["step"] not in at_fits:
            assert m["lr"] == pytest.approx(1e-3 * multiplier(m["step"]), abs=1e-12), m["step"]
    lrs = [m["lr"] for m in logged[4:]]
    assert all(a >= b for a, b in itertools.pairwise(lrs)) and lrs[-1] == 0


def test_a_resumed_budgeted_run_keeps_its_fits_and_ends_with_the_same_weights(setup, budgeted):  # noqa: F811
    """Resumed from step 30, past the probe's fit and the first refit and before the next: the resumed run must
    take both from the state and time the steps after its own first, to fit the same counts and end the same."""
    root, _ = setup
    resumed = root / "budget-resumed"
    shutil.copytree(budgeted, resumed)
    for later in list_checkpoints(resumed)[3:]:
        shutil.rmtree(later)
    shutil.rmtree(resumed / "final")
    state, uninterrupted = last_state(resumed), last_state(budgeted)
    assert state["step"] == 30 and len(state["fits"]) == 2 < len(uninterrupted["fits"])
    budgeted_run(setup, resumed.name, "train.resume=auto")
    fits = last_state(resumed)["fits"]
    assert [f[:2] for f in fits] == [f[:2] for f in uninterrupted["fits"]] and fits[:2] == state["fits"]
    logged = [m for m in read_metrics(resumed) if "loss" in m]
    assert [m["step"] for m in logged[29:31]] == [30, 31] and logged[29]["lr"] > 0  # the resumed steps learn
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
    state = last_state(final.parent)
    assert state["step"] == 12 and state["step_seconds"] < 100  # nor are they the budget's time


@pytest.mark.slow
def test_two_processes_of_unequal_clocks_fix_one_count_and_end_together(setup, tmp_path):  # noqa: F811
    """Launched on 2 processes whose clocks differ (the second's runs 1.5x fast: tests/budget_ranks.py), each
    times its own steps; at the probe's fit and at each refit both take the slowest figures, plan the same count,
    run it and end. A process planning its own count would stop while the other waits in a collective."""
    from conftest import launch_two_processes

    _, base = setup
    run = tmp_path / "run"
    args = ["configs/pretrain/mini_zh.yaml", *base, f"output_dir={run}", "train.budget_minutes=0.25"]
    args += ["train.max_steps=100000", "train.warmup_steps=4", "train.eval_every=0", "train.save_every=100000"]
    result = launch_two_processes("tests/budget_ranks.py", args, script=True)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [x for x in result.stderr.splitlines() if "the schedule follows" in x]  # logged once, by the main one
    refits = [x for x in result.stderr.splitlines() if "the schedule's rest is fitted" in x]
    state = last_state(run)
    fits = state["fits"]
    assert int(line.rsplit("follows ", 1)[1].split()[0]) == fits[0][1] and len(refits) == len(fits) - 1 >= 1
    assert state["planned_steps"] == state["step"] == fits[-1][1] > PROBE_STEPS
    assert "2 processes" in result.stderr
