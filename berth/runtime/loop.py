"""The one training loop of every stage, on Accelerate: one process, DDP, DeepSpeed ZeRO-2/3 or FSDP2.

What differs between pretraining and fine-tuning (the data, the model, the loss terms, evaluation, the export)
plugs in behind `Stage`; what differs between engines behind `berth.runtime.engines.Engine`; `Loop.run` reads
top to bottom. Counters live in `TrainState`, saved as JSON with every checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from berth.core.config import dump_config, save_config, to_dict
from berth.core.errors import BerthError
from berth.core.files import recover
from berth.core.hub import HubConfig, check_push
from berth.runtime.accel import build_accelerator
from berth.runtime.budget import StepBudget, StepClock, planned_counts
from berth.runtime.checkpoint import (
    check_same_run,
    checkpoint_dir,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from berth.runtime.collective import check_output_shared
from berth.runtime.config import TrainConfig
from berth.runtime.dropout import use_fast_dropout
from berth.runtime.engines import Engine, ShardingHints, build_engine
from berth.runtime.optim import build_optimizer
from berth.runtime.prefetch import PREFETCH_AUTO, Prefetched, pinned
from berth.runtime.schedules import build_scheduler, planned_curve
from berth.runtime.tracking import MetricsLog, flat_config, peak_memory_mb

logger = logging.getLogger(__name__)

# A micro-batch: the stage's tensors by name. The loop reads one field of it, TOKEN_MASK [B, L] (1 at a real
# token, 0 at padding), to count the tokens trained on; every other field is the stage's own.
Batch = dict[str, torch.Tensor]
TOKEN_MASK = "attention_mask"


@dataclass
class TrainState:
    """Counters and the data position: everything that changes during a run (the config never does)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    epoch_step: int = 0  # optimizer steps of this epoch already done: where a resumed run picks up
    global_batch: int = 0  # units per optimizer step; a resumed run must take the same
    tokens: int = 0  # real (non-padding) tokens trained on, over all processes
    evaluated_at: int = -1  # the step of the last evaluation
    best_metric: float | None = None
    best_step: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)  # the validation figures of the best weights
    evals_since_best: int = 0
    stopped_early: bool = False
    data_key: dict[str, str] = field(default_factory=dict)  # what the data was made of: a resume must match it
    elapsed: float = 0.0  # seconds of training before this process started (resumed runs)
    step_seconds: float = 0.0  # of those, the optimizer steps' (their batches included; evaluations left out)
    planned_steps: int = 0  # train.budget_minutes: the step count the budget fits, once timed
    fits: list[list[float]] = field(default_factory=list)  # the budget's fits: [after step, count, step_seconds] each


class RunConfig(Protocol):
    """What the loop reads of a stage's config: the shared sections. The rest is the stage's."""

    @property
    def output_dir(self) -> str: ...

    @property
    def train(self) -> TrainConfig: ...

    @property
    def hub(self) -> HubConfig: ...


class Stage(Protocol):
    """What the loop needs from a stage. The loop owns the optimizer, schedule, accumulation, logging,
    evaluation cadence, best-so-far tracking, checkpoints and resume; the stage owns its data and model."""

    name: str  # for the progress bar: "pretraining", "fine-tuning ner"
    # Config sections whose change makes a checkpoint meaningless for this run (train may change).
    resume_sections: tuple[str, ...]
    # The validation figure that picks the best weights and drives early stopping ("" for none) and whether
    # lower is better.
    metric: str
    lower_is_better: bool
    # Stop after this many evaluations in a row without a better `metric`; 0: never stop early.
    patience: int

    def build(self, acc: Accelerator, engine: Engine) -> torch.nn.Module:
        """Load data and build the module to train (every parameter goes to the optimizer). `engine` is the
        one the model will be spread with: the stage asks it for the whole weights (best/, exports)."""

    def sharding_hints(self) -> ShardingHints:
        """What a sharding engine cannot read from the built module's forward (after `build`)."""

    def steps_per_epoch(self, global_batch: int, acc: Accelerator) -> int: ...

    def data_key(self) -> dict[str, str]:
        """Fingerprints of what the training data was made of (corpus or files, tokenizer), after `build`."""

    def epoch_steps(self, epoch: int, skip: int, global_batch: int, acc: Accelerator) -> Iterator[list[Batch]]:
        """This process's micro-batches of each optimizer step of `epoch`, after its first `skip` steps; each
        holds TOKEN_MASK. Work that involves the other processes happens in this call; the iterator it returns may
        run in another thread (`train.prefetch`), where no collective may run."""

    def targets(self, batch: Batch) -> torch.Tensor:
        """[T] how many prediction targets each loss term has in `batch` (float)."""

    def forward(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """[T] loss sums of `batch`, and figures to sum for the log (detached)."""

    def log_fields(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        """Log fields from the figures summed over processes and steps since the last log line."""

    def evaluate(self, model: torch.nn.Module, acc: Accelerator) -> dict[str, Any]:
        """Validation figures (names without the eval_ prefix); empty when there is nothing to evaluate on."""

    def save_best(self, model: torch.nn.Module, state: TrainState, acc: Accelerator) -> None:
        """Keep the weights that just gave the best validation figure (called on every process)."""

    def checkpoint_saved(self, model: torch.nn.Module, state: TrainState, acc: Accelerator) -> None:
        """Called on every process after each checkpoint (pretraining may push it to the hub)."""

    def finish(self, model: torch.nn.Module, state: TrainState, acc: Accelerator) -> Path:
        """Evaluate and export once training is over; returns the export directory."""


class Loop:
    """One run: the stage's model trained with the config's `train` section; `run` reads top to bottom."""

    def __init__(self, cfg: RunConfig, stage: Stage, find_unused: bool = False):
        self.cfg, self.stage = cfg, stage
        self.train: TrainConfig = cfg.train
        self.out = Path(cfg.output_dir)
        t = self.train
        self.accelerator = build_accelerator(t.precision, t.trackers, str(self.out), find_unused, t.dist_timeout)
        self.state = TrainState()
        self.sums: dict[str, torch.Tensor] = {}
        self.first_bad = torch.tensor(-1, device=self.accelerator.device)
        self.checkpointed_at = -1

    @property
    def global_batch(self) -> int:
        return self.train.batch_size * self.accelerator.num_processes * self.train.grad_accum

    # -- set-up --------------------------------------------------------------------------------------------

    def build(self) -> None:
        t, acc = self.train, self.accelerator
        torch.manual_seed(t.seed)  # the same initial weights on every process
        self.engine: Engine = build_engine(acc, t)
        self.inner = self.stage.build(acc, self.engine)
        if acc.device.type == "cpu":
            use_fast_dropout(self.inner)  # PyTorch's CPU dropout mask (bernoulli_) is the slow part of a step
        # FSDP2 shards here, before the optimizer sees the weights
        self.inner = self.engine.wrap(self.inner, self.stage.sharding_hints())
        self.steps_per_epoch = self.stage.steps_per_epoch(self.global_batch, acc)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.warmup = t.warmup(self.total_steps)
        if self.warmup > self.total_steps:
            raise BerthError(
                f"train.warmup_steps={self.warmup} is longer than the run ({self.total_steps} optimizer steps)"
            )
        betas = (t.adam_beta1, t.adam_beta2)
        optimizer = build_optimizer(self.inner, t.optimizer, t.lr, t.weight_decay, betas, t.adam_eps, acc.device.type)
        self.model, self.optimizer = self.engine.prepare(acc, self.inner, optimizer)
        # on the prepared optimizer: ZeRO-3 regroups the parameters of the one it is given
        self.scheduler = build_scheduler(
            self.optimizer, t.schedule, self.warmup, self.total_steps, t.min_lr_ratio, t.decay_fraction
        )
        self.state.global_batch = self.global_batch
        self.state.data_key = self.stage.data_key()
        self.budget = StepBudget(t.budget_minutes, self.total_steps, self.warmup) if t.budget_minutes else None

    @property
    def saved_objects(self) -> dict[str, Any]:
        """What a checkpoint holds beside the loop's state."""
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def maybe_resume(self, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        current, sections = to_dict(self.cfg), self.stage.resume_sections
        saved = load_checkpoint(self.accelerator, self.engine, checkpoint, self.saved_objects, current, sections)
        state = TrainState(**saved)
        check_same_run(checkpoint, state.data_key, state.global_batch, self.state.data_key, self.global_batch)
        self.state = state
        self.checkpointed_at = state.step
        if state.planned_steps:  # the budget's counts, timed by the interrupted run
            self.plan()
        if self.accelerator.is_main_process:
            where = f"at step {state.step} (epoch {state.epoch}, step {state.epoch_step} of it)"
            logger.info("resumed from %s %s", checkpoint, where)

    def start_logging(self) -> None:
        t, acc = self.train, self.accelerator
        resumed = self.state.step > 0
        self.metrics = MetricsLog(self.out, acc.is_main_process, self.state.step if resumed else None)
        if acc.is_main_process:
            save_config(self.cfg, self.out)
            plan = planned_curve(t.lr, t.schedule, self.warmup, self.total_steps, t.min_lr_ratio, t.decay_fraction)
            logger.info(
                "%s: %d optimizer steps (%d an epoch); planned learning rate (%s, warm-up %d): %s",
                self.stage.name,
                self.total_steps,
                self.steps_per_epoch,
                t.schedule,
                self.warmup,
                ", ".join(f"{s}: {lr:.2e}" for s, lr in plan),
            )
            logger.info(
                "global batch %d = %d per process x %d processes x %d accumulation; %s; precision %s",
                self.global_batch,
                t.batch_size,
                acc.num_processes,
                t.grad_accum,
                self.engine.name,
                acc.mixed_precision,
            )
        if t.trackers:
            # wandb writes its run folder into the run directory, not the current one
            self.out.mkdir(parents=True, exist_ok=True)
            init = {"wandb": {"dir": str(self.out)}} if "wandb" in t.trackers else {}
            acc.init_trackers(self.out.name, config=flat_config(to_dict(self.cfg)), init_kwargs=init)
        self.start_time = time.perf_counter() - self.state.elapsed
        self.last_log = self.state.step
        self.clock = StepClock()

    # -- one optimizer step --------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[Batch]) -> None:
        acc, device = self.accelerator, self.accelerator.device
        micro_batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro_batches]
        # Each loss term is divided by its number of targets over every process and micro-batch before
        # backward, so the step's gradient is the same whatever the split and no engine rescales after its step.
        local = torch.stack([self.stage.targets(b) for b in micro_batches]).sum(0)  # [T]
        totals = acc.reduce(local, reduction="sum").clamp(min=1)  # [T]
        self.model.train()
        for k, batch in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            with self.engine.micro_batch(self.model, last):  # gradients synchronised on the last one only
                losses, figures = self.stage.forward(self.model, batch)  # [T], {name: scalar}
                loss = (losses / totals).sum()
                self.engine.backward(self.model, loss, last)
            self.accumulate(loss.detach(), figures, batch)
        self.sums["grad_norm"] = self.engine.step(self.model, self.optimizer, self.train.max_grad_norm)
        self.scheduler.step()
        self.state.step += 1
        self.state.epoch_step += 1

    def accumulate(self, loss: torch.Tensor, figures: dict[str, torch.Tensor], batch: Batch) -> None:
        mask = batch[TOKEN_MASK]
        values = {
            **figures,
            "loss": loss,
            "tokens": mask.sum().float(),
            "slots": torch.tensor(float(mask.numel()), device=mask.device),
        }
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value
        # Kept on the device (no sync): the first step whose loss was not finite, or -1.
        step = torch.tensor(self.state.step + 1, device=loss.device)
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)

    # -- helpers the loop calls ----------------------------------------------------------------------------

    def maybe_log(self, force: bool = False) -> None:
        if (not force and self.state.step % self.train.log_every) or not self.sums:
            return  # not a log step, or nothing trained since the last log line
        acc = self.accelerator
        grad_norm = self.sums.pop("grad_norm", torch.zeros(())).float()
        sums = {k: acc.reduce(v.reshape(1), reduction="sum").item() for k, v in sorted(self.sums.items())}
        self.sums = {}
        self.check_finite(sums["loss"])
        seconds = max(self.clock.lap(), 1e-9)  # the steps' own, since the last line: no evaluation in the rates
        self.state.tokens += int(sums["tokens"])
        record = {
            "step": self.state.step,
            "time": round(time.perf_counter() - self.start_time, 3),
            "epoch": self.state.epoch,
            # each process adds its share of the global mean, so the sum over processes is the step loss
            "loss": sums["loss"] / max(self.state.step - self.last_log, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm.item(),
            "tokens_per_s": sums["tokens"] / seconds,
            **self.stage.log_fields(sums, seconds),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        }
        self.last_log = self.state.step
        self.emit(record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}", refresh=False)

    def check_finite(self, loss: float) -> None:
        first = int(self.accelerator.reduce(self.first_bad.reshape(1), reduction="max").item())
        if first >= 0 or not math.isfinite(loss):
            where = f"step {first}" if first >= 0 else f"the steps up to {self.state.step}"
            raise BerthError(
                f"the loss is not finite at {where}; stopping. The last good checkpoint is kept in "
                f"{self.out / 'checkpoints'}; lower train.lr or use train.precision=fp32"
            )

    def emit(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.train.trackers:
            numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self.accelerator.log(numbers, step=record["step"])

    def maybe_eval(self, force: bool = False) -> None:
        every = self.train.eval_every
        if (not force and (not every or self.state.step % every)) or self.state.evaluated_at == self.state.step:
            return
        self.maybe_log(force=True)  # weights from a non-finite loss are never evaluated or kept as the best
        self.state.evaluated_at = self.state.step
        metrics = self.stage.evaluate(self.model, self.accelerator)
        if not metrics:
            return  # the stage has nothing to evaluate on (it said so once)
        record = {"step": self.state.step, "time": round(time.perf_counter() - self.start_time, 3)}
        self.emit({**record, "epoch": self.state.epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
        if self.stage.metric:
            self.track_best(metrics)

    def track_best(self, metrics: dict[str, Any]) -> None:
        state, name = self.state, self.stage.metric
        value, best = metrics[name], state.best_metric
        improved = best is None or (value < best if self.stage.lower_is_better else value > best)
        if improved:
            state.best_metric, state.best_step, state.best_metrics = value, state.step, metrics
            state.evals_since_best = 0
            self.stage.save_best(self.model, state, self.accelerator)
        else:
            state.evals_since_best += 1
            patience = self.stage.patience
            state.stopped_early = bool(patience) and state.evals_since_best >= patience
        so_far = f"best {state.best_metric:.4f} at step {state.best_step}"
        logger.info("step %d: validation %s %.4f (%s)", state.step, name, value, so_far)

    def maybe_checkpoint(self, force: bool = False) -> None:
        t, step = self.train, self.state.step
        due = step % t.save_every == 0 if t.save_every else self.state.evaluated_at == step
        if not t.keep_checkpoints or not (due or force) or self.checkpointed_at == step:
            return
        self.checkpointed_at = step
        self.maybe_log(force=True)  # never save a state whose loss went non-finite
        self.state.elapsed = time.perf_counter() - self.start_time
        state, config = asdict(self.state), dump_config(self.cfg)
        save_checkpoint(
            self.accelerator, self.engine, self.out, step, self.saved_objects, state, config, t.keep_checkpoints
        )
        self.stage.checkpoint_saved(self.model, self.state, self.accelerator)

    def plan(self) -> None:
        """Follow the budget's fits in the state (train.budget_minutes) from the next step on: the count of the
        latest, and a schedule planned on the first and refitted to each later one."""
        t = self.train
        first, self.total_steps, refits = planned_counts(self.state.fits, self.state.planned_steps)
        self.state.planned_steps = self.total_steps
        self.scheduler = build_scheduler(
            self.optimizer, t.schedule, self.warmup, first, t.min_lr_ratio, t.decay_fraction, self.state.step, refits
        )
        if hasattr(self, "bar"):
            self.bar.total = self.total_steps

    def count_time(self) -> None:
        """Add the step just done to the steps' time; the budget fixes the step count at the end of its probe and
        fits it again later (budget.REFIT_AT)."""
        self.state.step_seconds += self.clock.stop()
        if self.budget is not None:
            fit = self.budget.observe(self.state.step, self.state.step_seconds, self.state.fits, self.accelerator)
            if fit:
                self.state.fits.append(fit)
                self.plan()

    def done(self) -> bool:
        return self.state.step >= self.total_steps or self.state.stopped_early

    # -- the run -------------------------------------------------------------------------------------------

    def run(self) -> Path:
        if self.cfg.hub.push:
            check_push(self.cfg.hub.repo_id)  # before hours of training, not after
        if self.accelerator.is_main_process:
            for directory in (self.out, checkpoint_dir(self.out)):
                recover(directory)  # what an interrupted save left
        self.accelerator.wait_for_everyone()
        check_output_shared(self.accelerator, self.out)
        checkpoint = resolve_resume(self.train.resume, self.out)  # before data preparation: fails fast
        self.build()
        self.maybe_resume(checkpoint)
        self.start_logging()
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc=self.stage.name,
            unit="step",
            disable=not (self.accelerator.is_main_process and self.train.progress_bar),
            dynamic_ncols=True,
        )
        self.clock.start()
        while not self.done():
            with self.steps() as steps:
                for micro_batches in steps:
                    self.train_step(micro_batches)
                    self.bar.update(1)
                    self.maybe_log()
                    self.count_time()
                    self.maybe_eval()
                    self.maybe_checkpoint()
                    if self.done():
                        break
                    self.clock.start()  # evaluations and checkpoints are not the steps' time
                else:
                    self.state.epoch, self.state.epoch_step = self.state.epoch + 1, 0
                    if not self.train.eval_every:
                        self.maybe_eval(force=True)
                        self.maybe_checkpoint()
                        self.clock.start()
        self.bar.close()
        self.maybe_eval(force=True)
        self.maybe_checkpoint(force=True)
        self.maybe_log(force=True)
        if self.state.stopped_early:
            logger.info("stopped early at step %d: no better %s lately", self.state.step, self.stage.metric)
        self.state.elapsed = time.perf_counter() - self.start_time
        final = self.stage.finish(self.model, self.state, self.accelerator)
        if self.accelerator.is_main_process:
            logger.info("exported %s", final)
        self.accelerator.end_training()
        return final

    def epoch_steps(self) -> Iterator[list[Batch]]:
        return self.stage.epoch_steps(self.state.epoch, self.state.epoch_step, self.global_batch, self.accelerator)

    def steps(self) -> contextlib.AbstractContextManager[Iterator[list[Batch]]]:
        """The rest of this epoch's steps, prepared `train.prefetch` steps ahead in a thread (pinned on CUDA)."""
        device = self.accelerator.device.type
        depth = self.train.prefetch if self.train.prefetch >= 0 else (0 if device == "cpu" else PREFETCH_AUTO)
        if not depth:
            return contextlib.nullcontext(self.epoch_steps())
        return Prefetched(self.epoch_steps(), depth, pinned if device == "cuda" else None)
