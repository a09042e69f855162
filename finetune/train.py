"""Fine-tuning as a stage of the shared loop: a task's data, model and metrics; best/ kept, final/ exported."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from berth.core.errors import BerthError
from berth.core.hub import push_folder
from berth.core.layout import FINAL_DIR
from berth.core.vocab import load_tokenizer, tokenizer_fingerprint
from berth.finetune.batching import length_grouped_batches
from berth.finetune.config import FinetuneConfig
from berth.finetune.export import BEST, best_weights, export_finetuned, save_model_dir
from berth.finetune.modeling import check_init, check_vocab, dropout_overrides, load_model_config
from berth.finetune.registry import task_kind
from berth.finetune.task import Task
from berth.runtime.engines import Engine, ShardingHints
from berth.runtime.loop import Batch, Loop, TrainState

logger = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "test_predictions.jsonl"
# Sections whose change makes a checkpoint meaningless for this run (the train section may change).
RESUME_SECTIONS = ("task", "model", "data")


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


class FinetuneStage:
    """A task (classification or NER) plugged into the shared loop (`berth.runtime.loop.Stage`): the best
    weights by the validation metric are kept in best/, evaluated on test at the end and exported to final/."""

    resume_sections: tuple[str, ...] = RESUME_SECTIONS

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.name = f"fine-tuning {cfg.task}"
        self.metric = cfg.train.metric
        self.lower_is_better = lower_is_better(cfg.train.metric)
        self.patience = cfg.train.early_stopping_patience

    def build(self, acc: Accelerator, engine: Engine) -> torch.nn.Module:
        cfg, m, self.engine = self.cfg, self.cfg.model, engine
        kind = task_kind(cfg.task)
        valid = kind.task.metrics
        if cfg.train.metric not in valid:
            raise BerthError(
                f"train.metric={cfg.train.metric}: not a {cfg.task} metric; choose one of {', '.join(valid)}"
            )
        init = check_init(m.init)
        self.tokenizer = load_tokenizer(init)
        config = load_model_config(init, dropout_overrides(m.hidden_dropout, m.attention_dropout, m.classifier_dropout))
        check_vocab(self.tokenizer, config, init)
        self.task: Task = kind.task(cfg, self.tokenizer)
        return self.task.build_model(init, config, m.from_scratch)

    def sharding_hints(self) -> ShardingHints:
        return ShardingHints(forward_methods=self.task.forward_methods)

    def data_key(self) -> dict[str, str]:
        return {"data": self.task.fingerprint(), "tokenizer": tokenizer_fingerprint(self.tokenizer)}

    def steps_per_epoch(self, global_batch: int, acc: Accelerator) -> int:
        units, _ = self.task.train_units(0)
        # the last, smaller batch of an epoch counts when every process and micro-batch gets a part of it
        full, rest = divmod(len(units), global_batch)
        return max(1, full + (rest >= self.cfg.train.grad_accum * acc.num_processes))

    def epoch_steps(self, epoch: int, skip: int, global_batch: int, acc: Accelerator) -> Iterator[list[Batch]]:
        """A step takes the next global batch of the epoch's length-grouped order; process r's micro-batch k is its
        (k x processes + r)-th part, so a step holds the same examples whatever the number of processes."""
        t = self.cfg.train
        units, lengths = self.task.train_units(epoch)
        parts = t.grad_accum * acc.num_processes
        batches = length_grouped_batches(lengths, global_batch, t.seed, epoch, t.group_by_length)
        # the order is fixed by (seed, epoch), so a resumed run skips exactly the steps it already took
        for indices in [b for b in batches if len(b) >= parts][skip:]:
            split = np.array_split(np.asarray(indices), parts)
            yield [
                self.task.collate([units[i] for i in split[k * acc.num_processes + acc.process_index]])
                for k in range(t.grad_accum)
            ]

    def targets(self, batch: Batch) -> torch.Tensor:
        return self.task.targets(batch).float().reshape(1)  # [1]

    def forward(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self.task.loss(model, batch).reshape(1)  # [1]
        return loss, {"targets": self.task.targets(batch).float()}

    def log_fields(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        # loss targets a second: texts or windows (classification), tagged tokens (NER)
        return {"targets_per_s": sums["targets"] / seconds}

    def evaluate(self, model: torch.nn.Module, acc: Accelerator) -> dict[str, Any]:
        metrics, _ = self.task.evaluate(model, "validation", acc, self.cfg.train.eval_batch_size)
        return metrics

    def save_best(self, model: torch.nn.Module, state: TrainState, acc: Accelerator) -> None:
        weights = self.engine.full_state_dict(model)  # gathered on every process where the engine shards it
        if acc.is_main_process:
            settings = self.task.export_settings(state.best_metrics.get("aggregation", ""))
            save_model_dir(acc.unwrap_model(model), self.tokenizer, settings, self.out / BEST, weights)
        acc.wait_for_everyone()

    def checkpoint_saved(self, model: torch.nn.Module, state: TrainState, acc: Accelerator) -> None:
        pass

    def finish(self, model: torch.nn.Module, state: TrainState, acc: Accelerator) -> Path:
        """Reload the best weights, evaluate them on test, and export to final/."""
        t = self.cfg.train
        self.engine.load_full_state_dict(model, best_weights(acc.unwrap_model(model), self.out / BEST))
        aggregation = state.best_metrics.get("aggregation") or None
        results: dict[str, Any] = {"best_step": state.best_step, "steps": state.step, "metric": t.metric}
        results["validation"] = state.best_metrics  # measured on these very weights when they were saved
        predictions: list[dict[str, Any]] = []
        if "test" in self.task.splits:
            results["test"], predictions = self.task.evaluate(model, "test", acc, t.eval_batch_size, aggregation)
            results.update(self.task.test_extras(model, acc, t.eval_batch_size))
        results["train_seconds"] = round(state.elapsed, 1)
        final = self.out / FINAL_DIR
        if acc.is_main_process:
            write_json(self.out / RESULTS_FILE, results)
            if predictions:
                write_jsonl(self.out / PREDICTIONS_FILE, predictions)
            export_finetuned(self.out / BEST, final, self.cfg, results)
            if self.cfg.hub.push:
                hub = self.cfg.hub
                push_folder(final, hub.repo_id, hub.revision, hub.private, "berth: fine-tuned model")
        acc.wait_for_everyone()
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
    return Loop(cfg, FinetuneStage(cfg)).run()
