"""The pretraining loop on Accelerate: one process, DDP, or anything an Accelerate config describes."""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from berth.config import dump_config, save_config, to_dict
from berth.errors import BerthError
from berth.hub import check_push, push_folder
from pretrain.config import PretrainConfig
from pretrain.data import check_seq_len
from pretrain.export import export_final
from pretrain.masking import EpochExamples, MaskingCollator, pack_batch
from pretrain.model import PretrainingObjective, build_model, load_sentence_head
from pretrain.prepare import PreparedData, prepare
from runtime.accel import build_accelerator
from runtime.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from runtime.dropout import use_fast_dropout
from runtime.optim import build_optimizer
from runtime.schedules import build_scheduler, planned_curve
from runtime.tracking import MetricsLog
from tokenizer.train import ensure_tokenizer

logger = logging.getLogger(__name__)

# Sections whose change makes a checkpoint meaningless for this run (the train section may change).
RESUME_SECTIONS = ("tokenizer", "corpus", "data", "model")
MODEL_INPUTS = (
    "input_ids",
    "token_type_ids",
    "attention_mask",
    "mlm_positions",
    "mlm_labels",
    "next_sentence_label",
    "position_ids",
    "sequence_ids",
    "cls_positions",
)
# Dense bf16 peak FLOP/s of one device, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


@dataclass
class TrainState:
    """Counters and the data position: everything that changes during a run (the config never does)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    epoch_offset: int = 0  # examples of this epoch already consumed, over all processes
    tokens: int = 0  # real (non-padding) tokens trained on, over all processes
    elapsed: float = 0.0  # seconds of training before this process started (resumed runs)


def global_batch(cfg: PretrainConfig, accelerator: Accelerator) -> int:
    return cfg.train.batch_size * accelerator.num_processes * cfg.train.grad_accum


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1]).permutation(n)


def batches(
    prepared: PreparedData, cfg: PretrainConfig, state: TrainState, accelerator: Accelerator
) -> Iterator[list[dict]]:
    """The micro-batches of this process from the data position on, epoch after epoch.

    One optimizer step takes the next global_batch examples of the epoch's shuffled order; micro-batch k of
    process r is the r-th slice of the k-th block. The same examples make up a step whatever the process
    count, and resuming jumps to the position without reading the examples before it.
    """
    collator = MaskingCollator(cfg.data, prepared.special)
    size, rank, procs = cfg.train.batch_size, accelerator.process_index, accelerator.num_processes
    per_step = global_batch(cfg, accelerator)
    while True:
        with accelerator.main_process_first():
            examples = EpochExamples(prepared.examples("train", state.epoch), cfg.data.seed, state.epoch)
        if len(examples) < per_step:
            raise BerthError(f"an epoch has {len(examples)} examples, fewer than one global batch ({per_step})")
        order = epoch_order(cfg.data.seed, state.epoch, len(examples))
        while state.epoch_offset + per_step <= len(examples):
            block = order[state.epoch_offset : state.epoch_offset + per_step]
            micro = [
                block[(k * procs + rank) * size : (k * procs + rank + 1) * size] for k in range(cfg.train.grad_accum)
            ]
            # The position moves before the step runs, so a checkpoint after it resumes at the next block.
            state.epoch_offset += per_step
            for indices in micro:
                yield collate([examples[int(i)] for i in indices], collator, cfg)
        state.epoch, state.epoch_offset = state.epoch + 1, 0


def collate(examples: list[dict], collator: MaskingCollator, cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    batch = collator(examples)
    if not cfg.data.pack_sequences:
        return batch
    return pack_batch(batch, cfg.data.max_seq_len, collator.special.pad, cfg.data.pad_to_multiple_of)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: batch[name] for name in MODEL_INPUTS if name in batch}


def flops_per_token(model: torch.nn.Module, seq_len: int, mask_prob: float) -> float:
    """Training FLOPs per token (nanoGPT's 6N + 12 L H T), with the MLM head's share only on masked tokens."""
    cfg = model.config
    embeddings = model.base_model.embeddings
    encoder = sum(p.numel() for p in model.base_model.parameters()) - sum(p.numel() for p in embeddings.parameters())
    head = cfg.hidden_size * cfg.vocab_size
    return 6 * encoder + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len + 6 * head * mask_prob


def peak_flops(cfg: PretrainConfig) -> float:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), 0.0)
    return 0.0


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Loop:
    """The pieces of one run and the helpers the loop calls; `run` reads top to bottom."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = build_accelerator(
            cfg.train.precision, cfg.train.trackers, str(self.out), find_unused=cfg.data.sentence_task == "none"
        )
        self.state = TrainState()
        self.sums: dict[str, torch.Tensor] = {}
        self.first_bad = torch.tensor(-1, device=self.accelerator.device)
        self.last_log = (0, time.perf_counter())  # (step, time) of the last log line

    # -- set-up --------------------------------------------------------------------------------------------

    def build(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        with acc.main_process_first():
            tokenizer = ensure_tokenizer(cfg.tokenizer.path, cfg.tokenizer.config)
            self.prepared = prepare(cfg, tokenizer)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every process
        special = self.prepared.special
        model = build_model(cfg.model, special.vocab_size, special.pad, special.cls, special.sep, acc.device.type)
        check_seq_len(cfg.data.max_seq_len, model.config.max_position_embeddings, "the model's position embeddings")
        self.flops_per_token = flops_per_token(model, cfg.data.max_seq_len, cfg.data.mask_prob)
        if acc.device.type == "cpu":
            use_fast_dropout(model)  # GPUs have a fused dropout kernel already
        self.objective = PretrainingObjective(model, self.prepared.special.vocab_size, cfg.data.sentence_task != "none")
        if self.objective.sentence_head is not None:
            load_sentence_head(self.objective.sentence_head, cfg.model.init)
        t = cfg.train
        optimizer = build_optimizer(
            self.objective, t.optimizer, t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps, acc.device.type
        )
        self.scheduler = build_scheduler(optimizer, t.schedule, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        self.model, self.optimizer = acc.prepare(self.objective, optimizer)
        acc.register_for_checkpointing(self.scheduler)

    def maybe_resume(self, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        self.state = TrainState(**load_checkpoint(self.accelerator, checkpoint, to_dict(self.cfg), RESUME_SECTIONS))
        logger.info(
            "resumed from %s at step %d (epoch %d, example %d)",
            checkpoint,
            self.state.step,
            self.state.epoch,
            self.state.epoch_offset,
        )

    def start_logging(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        resumed = self.state.step > 0
        self.metrics = MetricsLog(self.out, acc.is_main_process, self.state.step if resumed else None)
        if acc.is_main_process:
            save_config(cfg, self.out)
            plan = planned_curve(
                cfg.train.lr, cfg.train.schedule, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio
            )
            logger.info(
                "planned learning rate (%s, warm-up %d of %d optimizer steps): %s",
                cfg.train.schedule,
                cfg.train.warmup_steps,
                cfg.train.max_steps,
                ", ".join(f"{s}: {lr:.2e}" for s, lr in plan),
            )
            logger.info(
                "global batch %d = %d per process x %d processes x %d accumulation; precision %s",
                global_batch(cfg, acc),
                cfg.train.batch_size,
                acc.num_processes,
                cfg.train.grad_accum,
                acc.mixed_precision,
            )
        if cfg.train.trackers:
            acc.init_trackers(self.out.name, config=_flat(to_dict(cfg)))
        self.start_time = time.perf_counter() - self.state.elapsed
        self.last_log = (self.state.step, time.perf_counter())

    # -- one optimizer step --------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        acc, device = self.accelerator, self.accelerator.device
        micro_batches = [{k: v.to(device) for k, v in b.items()} for b in micro_batches]
        # Normalise by the counts over every process and micro-batch, so the step's gradient is the same
        # whatever the split; DDP averages over processes, hence the factor num_processes.
        local = torch.stack(
            [
                sum(b["mlm_labels"].numel() for b in micro_batches) * torch.ones((), device=device),
                sum((b["next_sentence_label"] >= 0).sum() for b in micro_batches).float(),
            ]
        )
        mlm_total, nsp_total = acc.reduce(local, reduction="sum").clamp(min=1)
        self.model.train()
        for k, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext() if k == len(micro_batches) - 1 else acc.no_sync(self.model)
            with sync:
                out = self.model(**model_inputs(batch))
                loss = out["mlm_loss"] / mlm_total
                if "nsp_loss" in out:
                    loss = loss + out["nsp_loss"] / nsp_total
                acc.backward(loss * acc.num_processes)
            self.accumulate(out, loss.detach(), batch)
        self.sums["grad_norm"] = acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

    def accumulate(self, out: dict[str, torch.Tensor], loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        real = batch["attention_mask"].sum()
        values = {
            **{k: v.detach().float() for k, v in out.items()},
            "loss": loss,
            "tokens": real.float(),
            "slots": torch.tensor(float(batch["attention_mask"].numel()), device=real.device),
        }
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value
        # Kept on the device (no sync): the first step whose loss was not finite, or -1.
        step = torch.tensor(self.state.step + 1, device=loss.device)
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)

    # -- helpers the loop calls ----------------------------------------------------------------------------

    def maybe_log(self, force: bool = False) -> None:
        if not force and self.state.step % self.cfg.train.log_every:
            return
        if not self.sums:
            return  # nothing trained since the last log line
        acc = self.accelerator
        grad_norm = self.sums.pop("grad_norm", torch.zeros(())).float()
        sums = {k: acc.reduce(v.reshape(1), reduction="sum").item() for k, v in sorted(self.sums.items())}
        self.sums = {}
        self.check_finite(sums.get("loss", 0.0))
        steps = self.state.step - self.last_log[0]
        now = time.perf_counter()
        self.state.tokens += int(sums.get("tokens", 0))
        tokens_per_s = sums.get("tokens", 0) / max(now - self.last_log[1], 1e-9)
        record = {
            "step": self.state.step,
            "time": round(now - self.start_time, 3),
            "epoch": self.state.epoch,
            # each process adds its share of the global mean, so the sum over processes is the step loss
            "loss": sums.get("loss", 0.0) / max(steps, 1),
            "mlm_loss": sums.get("mlm_loss", 0.0) / max(sums.get("mlm_count", 1), 1),
            "mlm_accuracy": sums.get("mlm_correct", 0.0) / max(sums.get("mlm_count", 1), 1),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "packing_efficiency": sums.get("tokens", 0.0) / max(sums.get("slots", 1.0), 1.0),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        }
        if "nsp_count" in sums:
            record["nsp_loss"] = sums["nsp_loss"] / max(sums["nsp_count"], 1)
            record["nsp_accuracy"] = sums["nsp_correct"] / max(sums["nsp_count"], 1)
        peak = peak_flops(self.cfg)
        if peak:
            record["mfu"] = tokens_per_s * self.flops_per_token / (peak * acc.num_processes)
        self.last_log = (self.state.step, now)
        self.emit(record)
        if hasattr(self, "bar"):
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
        if self.cfg.train.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def maybe_eval(self, force: bool = False) -> None:
        if not force and self.state.step % self.cfg.train.eval_every:
            return
        self.emit(
            {
                "step": self.state.step,
                "time": round(time.perf_counter() - self.start_time, 3),
                **evaluate(self.model, self.prepared, self.cfg, self.accelerator),
            }
        )

    def maybe_checkpoint(self, force: bool = False) -> None:
        if not force and self.state.step % self.cfg.train.save_every:
            return
        self.maybe_log(force=True)  # never save a state whose loss went non-finite
        self.state.elapsed = time.perf_counter() - self.start_time
        save_checkpoint(
            self.accelerator,
            self.out,
            self.state.step,
            asdict(self.state),
            dump_config(self.cfg),
            self.cfg.train.keep_last,
        )
        if self.cfg.hub.push and self.cfg.hub.push_checkpoints:
            self.push_checkpoint(f"step-{self.state.step}")

    def push_checkpoint(self, branch: str) -> None:
        """Export the current weights in Hugging Face format and upload them to `branch`, so users can study
        training dynamics; the export is removed afterwards (the checkpoint itself stays)."""
        acc, hub = self.accelerator, self.cfg.hub
        model = self.objective.model
        folder = export_final(acc, self.model, model, self.prepared.tokenizer, self.cfg, self.out, f".hub-{branch}")
        if acc.is_main_process:
            push_folder(folder, hub.repo_id, branch, hub.private, f"berth: checkpoint {branch}")
            shutil.rmtree(folder, ignore_errors=True)
        acc.wait_for_everyone()

    # -- the run -------------------------------------------------------------------------------------------

    def run(self) -> Path:
        if self.cfg.hub.push:
            check_push(self.cfg.hub.repo_id)  # before hours of training, not after
        checkpoint = resolve_resume(self.cfg.train.resume, self.out)  # before data preparation: fails fast
        self.build()
        self.maybe_resume(checkpoint)
        self.start_logging()
        cfg, acc = self.cfg, self.accelerator
        stream = batches(self.prepared, cfg, self.state, acc)
        self.bar = tqdm(
            total=cfg.train.max_steps,
            initial=self.state.step,
            desc="pretraining",
            unit="step",
            disable=not (acc.is_main_process and cfg.train.progress_bar),
            dynamic_ncols=True,
        )
        while self.state.step < cfg.train.max_steps:
            self.train_step([next(stream) for _ in range(cfg.train.grad_accum)])
            self.bar.update(1)
            self.maybe_log()
            self.maybe_eval()
            self.maybe_checkpoint()
        self.bar.close()
        if self.state.step % cfg.train.eval_every:
            self.maybe_eval(force=True)
        if self.state.step % cfg.train.save_every:
            self.maybe_checkpoint(force=True)
        final = export_final(acc, self.model, self.objective.model, self.prepared.tokenizer, cfg, self.out)
        if cfg.hub.push and acc.is_main_process:
            push_folder(final, cfg.hub.repo_id, cfg.hub.revision, cfg.hub.private, "berth: final pretrained model")
        acc.end_training()
        return final


@torch.no_grad()
def evaluate(model: torch.nn.Module, prepared: PreparedData, cfg: PretrainConfig, acc: Accelerator) -> dict[str, float]:
    """Held-out MLM loss, perplexity, masked-token accuracy and [CLS]-task accuracy, with a fixed mask.

    The validation examples of epoch 0 are masked by their own (seed, 0, index) generators, so every
    evaluation of a run (and of a resumed run) sees the very same masks. Dropout is off.
    """
    examples = EpochExamples(prepared.examples("validation", 0), cfg.data.seed, epoch=0)
    collator = MaskingCollator(cfg.data, prepared.special)
    mine = list(range(acc.process_index, len(examples), acc.num_processes))
    size = cfg.train.batch_size
    limit = cfg.train.eval_batches or len(mine)
    sums = torch.zeros(5, device=acc.device)  # mlm loss, mlm correct, mlm count, nsp correct, nsp count
    model.eval()
    for start in range(0, min(len(mine), limit * size), size):
        rows = collate([examples[i] for i in mine[start : start + size]], collator, cfg)
        out = model(**model_inputs({k: v.to(acc.device) for k, v in rows.items()}))
        sums += torch.stack(
            [
                out["mlm_loss"],
                out["mlm_correct"].float(),
                out["mlm_count"].float(),
                out.get("nsp_correct", torch.zeros((), device=acc.device)).float(),
                out.get("nsp_count", torch.zeros((), device=acc.device)).float(),
            ]
        )
    model.train()
    loss, correct, count, nsp_correct, nsp_count = acc.reduce(sums, reduction="sum").tolist()
    result = {
        "eval_mlm_loss": loss / max(count, 1),
        "eval_perplexity": math.exp(min(loss / max(count, 1), 50.0)),
        "eval_mlm_accuracy": correct / max(count, 1),
    }
    if nsp_count:
        result["eval_nsp_accuracy"] = nsp_correct / nsp_count
    return result


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value) if isinstance(value, list) else value
    return out


def pretrain(cfg: PretrainConfig) -> Path:
    """Train, evaluate, checkpoint and export to <output_dir>/final/. Returns that directory."""
    return Loop(cfg).run()
