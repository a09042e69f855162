"""Accelerate set-up: precision chosen for the hardware, trackers, and the facts the loop needs."""

from __future__ import annotations

import importlib.util

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs

from berth.core.errors import BerthError
from berth.runtime.tracking import configure_wandb

TRACKERS = ("wandb", "tensorboard")


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, cpu: bool) -> str:
    """auto: bf16 on GPUs that have it and on CPUs with AVX512-BF16/AMX, fp16 on older GPUs, else fp32."""
    cuda = torch.cuda.is_available() and not cpu
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise BerthError("train.precision=fp16 needs a CUDA GPU (loss scaling); use bf16 or fp32 on this machine")
    if precision == "bf16" and not cuda and not cpu_supports_bf16():
        raise BerthError("train.precision=bf16: this CPU has no bf16 support (AVX512-BF16/AMX); use fp32")
    return precision


def build_accelerator(precision: str, trackers: tuple[str, ...], project_dir: str, find_unused: bool) -> Accelerator:
    unknown = [t for t in trackers if t not in TRACKERS]
    if unknown:
        raise BerthError(f"train.trackers: unknown {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
    if "wandb" in trackers:
        configure_wandb()
    if "tensorboard" in trackers and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise BerthError("train.trackers: tensorboard is not installed; pip install tensorboard")
    cpu = not torch.cuda.is_available()
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[resolve_precision(precision, cpu)]
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused)]
    # Accelerate keeps one global state per process; a second run in the same process (the demo pretrains
    # and then fine-tunes) may need another precision. The distributed set-up (PartialState) is kept.
    AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=mixed,
        cpu=cpu,
        log_with=list(trackers) or None,
        project_dir=project_dir,
        kwargs_handlers=handlers,
    )
