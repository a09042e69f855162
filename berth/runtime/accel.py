"""Accelerate set-up: precision chosen for the hardware, trackers, and the facts the loop needs."""

from __future__ import annotations

import importlib.util
import os
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from berth.core.errors import BerthError
from berth.runtime.engines import requested_engine
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


def quiet_deepspeed() -> None:
    """DeepSpeed, once imported (Accelerate imports it wherever it is installed, to unwrap a model), prints its
    guess of the device to stdout, which carries berth's results (predict's JSON lines). Naming its CPU accelerator
    where there is no CUDA keeps it silent; it is the accelerator it would pick there anyway."""
    if importlib.util.find_spec("deepspeed") is not None and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_accelerator(
    precision: str, trackers: tuple[str, ...], project_dir: str, find_unused: bool, dist_timeout: int = 30
) -> Accelerator:
    """`dist_timeout`: minutes a collective may wait (train.dist_timeout); NCCL's own default is 10, gloo's 30."""
    unknown = [t for t in trackers if t not in TRACKERS]
    if unknown:
        raise BerthError(f"train.trackers: unknown {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
    if "wandb" in trackers:
        configure_wandb()
    if "tensorboard" in trackers and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise BerthError("train.trackers: tensorboard is not installed; pip install tensorboard")
    quiet_deepspeed()
    cuda = torch.cuda.is_available()
    engine = check_engine_request(cuda)
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[resolve_precision(precision, not cuda)]
    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=find_unused)]
    # Without CUDA, Accelerate's CPU set-up (gloo) gives every process its rank, but it takes DeepSpeed only
    # with cpu=False; DeepSpeed on CPU then needs gloo named, or each process would think it is alone.
    cpu = not cuda and engine != "deepspeed"
    backend = "gloo" if not cuda and engine == "deepspeed" else None
    handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=dist_timeout)))
    # Accelerate keeps one global state per process; a second run in the same process (the demo pretrains
    # and then fine-tunes) may need another precision. The distributed set-up (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mixed,
        cpu=cpu,
        log_with=list(trackers) or None,
        project_dir=project_dir,
        kwargs_handlers=handlers,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise BerthError(
            f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate set up {accelerator.num_processes}"
            ", so each would train alone; on CPU launch with configs/accelerate/cpu_ddp_2proc.yaml"
        )
    return accelerator


def check_engine_request(cuda: bool) -> str:
    """The engine the launch asks for (ddp, deepspeed, fsdp), refused in one line where berth cannot honour it
    rather than let it turn into something else silently."""
    engine = requested_engine()
    if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise BerthError(
            "the launch asks for DeepSpeed, which is not installed; pip install 'berth[deepspeed]' (or launch "
            "with a DDP config: configs/accelerate/multi_gpu.yaml, or cpu_ddp_2proc.yaml on CPU)"
        )
    return engine
