"""The `train` section every stage shares: one name per idea, one meaning in pretraining and fine-tuning.

A stage's own train section subclasses `TrainConfig`, adds its fields and may change a default; the loop
(`berth.runtime.loop`) reads only the fields defined here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from berth.core.config import check_rates
from berth.runtime.schedules import DECAY_FRACTION


@dataclass(frozen=True)
class TrainConfig:
    # Optimizer steps; 0: epochs x the steps of one epoch.
    max_steps: int = 0
    # Minutes of optimizer steps: the run times its first steps and fixes the step count that fits (at most
    # max_steps, or the steps of `epochs`); warm-up and decay follow that count. 0: no budget.
    budget_minutes: float = 0.0
    epochs: int = 1
    # Units per process per micro-batch; the global batch is batch_size x processes x grad_accum.
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    # Warm-up in optimizer steps; 0: warmup_ratio x all optimizer steps (BERT fine-tunes with 10%).
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Literal["linear", "cosine", "constant", "noam", "wsd"] = "linear"
    # wsd: the share of the run, at its end, over which the LR decays to min_lr_ratio x lr.
    decay_fraction: float = DECAY_FRACTION
    min_lr_ratio: float = 0.0
    optimizer: Literal["adamw", "lamb"] = "adamw"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # auto: bf16 on GPUs with it and on CPUs with AVX512-BF16/AMX, fp16 on older GPUs, else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    log_every: int = 20
    # Evaluate every N optimizer steps; 0: at the end of every epoch. The last step is always evaluated.
    eval_every: int = 0
    # Save a resumable checkpoint every N optimizer steps; 0: right after each evaluation.
    save_every: int = 0
    # How many of the newest checkpoints are kept (0: none is written).
    keep_checkpoints: int = 1
    # auto: continue from the newest checkpoint in output_dir (a fresh start when there is none); or a
    # checkpoint directory. A resumed run ends with the weights of an uninterrupted one.
    resume: str = ""
    trackers: tuple[str, ...] = ()
    progress_bar: bool = True
    # Minutes a process waits in a collective (a barrier, an all-reduce) before the run fails; it must cover the
    # longest stretch one process works while the others wait (data preparation on the main process first).
    dist_timeout: int = 30
    # Optimizer steps whose batches a background thread prepares ahead of the training step (16 covers the burst
    # of drawing a new chunk of examples); 0: in the training step; -1 (auto): 16 on GPUs, 0 on CPU, where the
    # thread would take cores from the step itself.
    prefetch: int = -1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "dist_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1]; got {self.decay_fraction}")
        if self.schedule != "wsd" and self.decay_fraction != DECAY_FRACTION:
            raise ValueError(
                f"decay_fraction={self.decay_fraction} does nothing with schedule={self.schedule} (wsd only)"
            )
        if not (math.isfinite(self.budget_minutes) and self.budget_minutes >= 0):
            raise ValueError(f"budget_minutes must be a finite number >= 0; got {self.budget_minutes}")
        if self.budget_minutes and self.warmup_ratio:
            raise ValueError(
                f"warmup_ratio={self.warmup_ratio} with budget_minutes: the step count is not known before the first "
                "step; give the warm-up in steps (warmup_steps)"
            )
        if self.prefetch < -1:
            raise ValueError(f"prefetch must be -1 (auto), 0 or more; got {self.prefetch}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0; got {self.lr}")
        check_rates(
            warmup_ratio=self.warmup_ratio,
            min_lr_ratio=self.min_lr_ratio,
            adam_beta1=self.adam_beta1,
            adam_beta2=self.adam_beta2,
        )
        if not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            raise ValueError(f"adam_eps must be a finite number > 0; got {self.adam_eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0; got {self.weight_decay}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0; got {self.max_grad_norm}")

    def warmup(self, total_steps: int) -> int:
        """Warm-up optimizer steps of a run of `total_steps`."""
        return self.warmup_steps or round(self.warmup_ratio * total_steps)
