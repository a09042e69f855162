"""The fine-tuning loop, on the same runtime as pretraining: Accelerate, schedules, optimizers, metrics log."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from berth.config import dump_config, save_config, to_dict
from berth.errors import BerthError
from berth.hub import check_push, push_folder
from finetune.batching import length_grouped_batches
from finetune.classification import ClassificationTask
from finetune.config import FinetuneConfig
from finetune.export import BEST, export_final, load_best, save_model_dir
from finetune.modeling import check_init, check_vocab, dropout_overrides, load_config, load_tokenizer
from finetune.ner import NerTask
from runtime.accel import build_accelerator
from runtime.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from runtime.dropout import use_fast_dropout
from runtime.optim import build_optimizer
from runtime.schedules import build_scheduler
from runtime.tracking import MetricsLog

logger = logging.getLogger(__name__)

TASKS = {"classification": ClassificationTask, "ner": NerTask}
RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "test_predictions.jsonl"
# Sections whose change makes a checkpoint meaningless for this run (the train section may change).
RESUME_SECTIONS = ("task", "model", "data")


@dataclass
class FinetuneState:
    """Counters of a run (the config never changes); saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # optimizer steps of this epoch already done: where a resumed run picks up
    best_metric: float | None = None
    best_step: int = 0
    best_aggregation: str = ""
    best_validation: dict[str, Any] = field(default_factory=dict)  # the metrics of the weights in best/
    evals_since_best: int = 0
    stopped_early: bool = False
    elapsed: float = 0.0  # seconds of training before this process started (resumed runs)


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


class FinetuneLoop:
    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = build_accelerator(cfg.train.precision, cfg.train.trackers, str(self.out), find_unused=False)
        self.state = FinetuneState()
        self.sums: dict[str, torch.Tensor] = {}
        self.last_eval_step = -1
        self.last_checkpoint_step = -1

    # -- set-up --------------------------------------------------------------------------------------------

    def build(self) -> None:
        cfg, acc, t = self.cfg, self.accelerator, self.cfg.train
        valid = TASKS[cfg.task].metrics
        if t.metric not in valid:
            raise BerthError(f"train.metric={t.metric}: not a {cfg.task} metric; choose one of {', '.join(valid)}")
        init = check_init(cfg.model.init)
        self.tokenizer = load_tokenizer(init)
        m = cfg.model
        config = load_config(init, dropout_overrides(m.hidden_dropout, m.attention_dropout, m.classifier_dropout))
        check_vocab(self.tokenizer, config, init)
        self.task = TASKS[cfg.task](cfg, self.tokenizer)
        torch.manual_seed(t.seed)  # the same task head on every process
        self.inner = self.task.build_model(init, config, m.from_scratch)
        if acc.device.type == "cpu":
            use_fast_dropout(self.inner)  # PyTorch's CPU dropout mask (bernoulli_) is the slow part of a step
        units, _ = self.task.train_units(0)
        # the last, smaller batch of an epoch counts when every process and micro-batch gets a part of it
        full, rest = divmod(len(units), self.global_batch)
        self.steps_per_epoch = max(1, full + (rest >= t.grad_accum * acc.num_processes))
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        optimizer = build_optimizer(self.inner, "adamw", t.lr, t.weight_decay, (0.9, 0.999), 1e-8, acc.device.type)
        warmup = round(t.warmup_ratio * self.total_steps)
        self.scheduler = build_scheduler(optimizer, t.schedule, warmup, self.total_steps)
        self.model, self.optimizer = acc.prepare(self.inner, optimizer)
        acc.register_for_checkpointing(self.scheduler)

    def maybe_resume(self, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        self.state = FinetuneState(**load_checkpoint(self.accelerator, checkpoint, to_dict(self.cfg), RESUME_SECTIONS))
        # a checkpoint is written right after an evaluation: that evaluation is not run again
        self.last_eval_step = self.last_checkpoint_step = self.state.step
        logger.info(
            "resumed from %s at step %d (epoch %d, step %d of it)",
            checkpoint,
            self.state.step,
            self.state.epoch,
            self.state.epoch_step,
        )

    @property
    def global_batch(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.grad_accum * self.accelerator.num_processes

    def start_logging(self) -> None:
        acc = self.accelerator
        resumed = self.state.step > 0
        self.metrics = MetricsLog(self.out, acc.is_main_process, self.state.step if resumed else None)
        if acc.is_main_process:
            save_config(self.cfg, self.out)
            logger.info(
                "fine-tuning %s for %d optimizer steps (%d a epoch), global batch %d, precision %s",
                self.cfg.task,
                self.total_steps,
                self.steps_per_epoch,
                self.global_batch,
                acc.mixed_precision,
            )
        if self.cfg.train.trackers:
            acc.init_trackers(self.out.name, config=to_dict(self.cfg))
        self.start_time = time.perf_counter() - self.state.elapsed
        self.last_log = (self.state.step, time.perf_counter())

    def epoch_steps(self, epoch: int, skip: int = 0) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The micro-batches of this process for each optimizer step of an epoch, after its first `skip` steps.
        A step takes the next global batch of the epoch's length-grouped order; process r's micro-batch k is its
        (k x processes + r)-th part, so a step holds the same examples whatever the number of processes."""
        t, acc = self.cfg.train, self.accelerator
        units, lengths = self.task.train_units(epoch)
        parts = t.grad_accum * acc.num_processes
        batches = length_grouped_batches(lengths, self.global_batch, t.seed, epoch, t.group_by_length)
        # the order is fixed by (seed, epoch), so a resumed run skips exactly the steps it already took
        for indices in [b for b in batches if len(b) >= parts][skip:]:
            split = np.array_split(np.asarray(indices), parts)
            yield [
                self.task.collate([units[i] for i in split[k * acc.num_processes + acc.process_index]])
                for k in range(t.grad_accum)
            ]

    # -- one optimizer step --------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        acc = self.accelerator
        micro_batches = [{k: v.to(acc.device) for k, v in b.items()} for b in micro_batches]
        self.model.train()
        outputs = []
        for k, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext() if k == len(micro_batches) - 1 else acc.no_sync(self.model)
            with sync:
                loss_sum, count = self.task.loss(self.model, batch)
                outputs.append((loss_sum, count))
                # The count over all processes and micro-batches is known only after the forward passes; the
                # loss is rescaled below through the gradient, which is linear in it.
                acc.backward(loss_sum)
        local = torch.stack([sum(c for _, c in outputs).float(), sum(s.detach() for s, _ in outputs)])
        total, loss_total = acc.reduce(local, reduction="sum")
        scale = acc.num_processes / total.clamp(min=1)  # DDP averages over processes
        for param in self.model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)
        self.sums["grad_norm"] = acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.epoch_step += 1
        self.sums["loss"] = self.sums.get("loss", 0) + loss_total / total.clamp(min=1)
        self.sums["units"] = self.sums.get("units", 0) + total

    # -- helpers the loop calls ----------------------------------------------------------------------------

    def maybe_log(self, force: bool = False) -> None:
        if (not force and self.state.step % self.cfg.train.log_every) or "loss" not in self.sums:
            return
        steps = self.state.step - self.last_log[0]
        now = time.perf_counter()
        record = {
            "step": self.state.step,
            "time": round(now - self.start_time, 3),
            "epoch": self.state.epoch,
            "loss": self.sums["loss"].item() / max(steps, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(self.sums["grad_norm"]),
            # loss targets a second: texts or windows (classification), tagged tokens (NER)
            "targets_per_s": self.sums["units"].item() / max(now - self.last_log[1], 1e-9),
        }
        if not math.isfinite(record["loss"]):
            raise BerthError(f"the fine-tuning loss is not finite at step {self.state.step}; lower train.lr")
        self.sums, self.last_log = {}, (self.state.step, now)
        self.emit(record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)

    def emit(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.cfg.train.trackers:
            numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self.accelerator.log(numbers, step=record["step"])

    def maybe_eval(self, force: bool = False) -> None:
        every = self.cfg.train.eval_every
        if not force and (not every or self.state.step % every):
            return
        if self.last_eval_step == self.state.step:
            return  # the end of an epoch can fall on an evaluation step
        self.last_eval_step = self.state.step
        t = self.cfg.train
        metrics, _ = self.task.evaluate(self.model, "validation", self.accelerator, t.eval_batch_size)
        self.emit(
            {
                "step": self.state.step,
                "time": round(time.perf_counter() - self.start_time, 3),
                "epoch": self.state.epoch,
                **{f"eval_{k}": v for k, v in metrics.items()},
            }
        )
        value = metrics[t.metric]
        best = self.state.best_metric
        improved = best is None or (value < best if lower_is_better(t.metric) else value > best)
        if improved:
            self.state.best_metric, self.state.best_step = value, self.state.step
            self.state.best_aggregation, self.state.evals_since_best = metrics.get("aggregation", ""), 0
            self.state.best_validation = metrics
            self.save_best()
        else:
            self.state.evals_since_best += 1
            patience = t.early_stopping_patience
            self.state.stopped_early = bool(patience) and self.state.evals_since_best >= patience
        logger.info(
            "step %d: validation %s %.4f (best %.4f at step %d)",
            self.state.step,
            t.metric,
            value,
            self.state.best_metric,
            self.state.best_step,
        )

    def save_best(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            settings = self.task.export_settings(self.state.best_aggregation)
            save_model_dir(
                acc.unwrap_model(self.model),
                self.tokenizer,
                settings,
                self.out / BEST,
                extra={"state": asdict(self.state)},
            )
        acc.wait_for_everyone()

    def maybe_checkpoint(self) -> None:
        """Right after an evaluation (best/ is then up to date), save everything a resumed run needs."""
        keep = self.cfg.train.keep_checkpoints
        if not keep or self.last_eval_step != self.state.step or self.last_checkpoint_step == self.state.step:
            return
        self.last_checkpoint_step = self.state.step
        self.maybe_log(force=True)  # the training loss so far goes into the log the resumed run continues
        self.state.elapsed = time.perf_counter() - self.start_time
        save_checkpoint(self.accelerator, self.out, self.state.step, asdict(self.state), dump_config(self.cfg), keep)

    def done(self) -> bool:
        return self.state.step >= self.total_steps or self.state.stopped_early

    # -- the run -------------------------------------------------------------------------------------------

    def run(self) -> Path:
        if self.cfg.hub.push:
            check_push(self.cfg.hub.repo_id)  # before training, not after
        checkpoint = resolve_resume(self.cfg.train.resume, self.out)  # before the set-up: bad input fails fast
        self.build()
        self.maybe_resume(checkpoint)
        self.start_logging()
        cfg = self.cfg
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc=f"fine-tuning {cfg.task}",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.accelerator.is_main_process and cfg.train.progress_bar),
        )
        while not self.done():
            for micro_batches in self.epoch_steps(self.state.epoch, skip=self.state.epoch_step):
                self.train_step(micro_batches)
                self.bar.update(1)
                self.maybe_log()
                self.maybe_eval()
                self.maybe_checkpoint()
                if self.done():
                    break
            self.state.epoch, self.state.epoch_step = self.state.epoch + 1, 0
            if not cfg.train.eval_every or self.done():
                self.maybe_eval(force=True)
                self.maybe_checkpoint()
        self.bar.close()
        self.maybe_log(force=True)
        if self.state.stopped_early:
            logger.info(
                "stopped early at step %d: no better %s in %d evaluations",
                self.state.step,
                cfg.train.metric,
                cfg.train.early_stopping_patience,
            )
        return self.finish()

    def finish(self) -> Path:
        """Reload the best weights, evaluate them on validation and test, and export to final/."""
        acc, t = self.accelerator, self.cfg.train
        load_best(acc.unwrap_model(self.model), self.out / BEST)
        aggregation = self.state.best_aggregation or None
        results: dict[str, Any] = {"best_step": self.state.best_step, "steps": self.state.step, "metric": t.metric}
        results["validation"] = self.state.best_validation  # measured on these very weights when they were saved
        predictions = []
        if "test" in self.task.splits:
            results["test"], predictions = self.task.evaluate(self.model, "test", acc, t.eval_batch_size, aggregation)
        data = self.cfg.data
        if (
            t.compare_truncation
            and "test" in self.task.splits
            and data.long_text == "windows"
            and not data.text_pair_column
        ):
            results["test_truncated"] = self.task.evaluate_truncated(self.model, "test", acc, t.eval_batch_size)
        results["train_seconds"] = round(time.perf_counter() - self.start_time, 1)
        if t.yardstick and self.task.kind == "classification" and acc.is_main_process:
            from finetune.yardstick import tfidf_yardstick

            results["yardstick"] = tfidf_yardstick(self.task, self.task.texts, t.seed)
        final = self.out / "final"
        if acc.is_main_process:
            write_json(self.out / RESULTS_FILE, results)
            if predictions:
                write_jsonl(self.out / PREDICTIONS_FILE, predictions)
            export_final(self.out / BEST, final, self.cfg, results)
            if self.cfg.hub.push:
                hub = self.cfg.hub
                push_folder(final, hub.repo_id, hub.revision, hub.private, "berth: fine-tuned model")
        acc.wait_for_everyone()
        acc.end_training()
        return final


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(finite(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    tmp.replace(path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def finite(value: Any) -> Any:
    """NaN (a metric with no examples, such as long-text accuracy without long texts) becomes null in JSON."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune, keep the best checkpoint, evaluate it, and export to <output_dir>/final/."""
    return FinetuneLoop(cfg).run()
