"""How the model is spread over processes: replicated (one process, DDP), DeepSpeed ZeRO-2/3, or FSDP2.

The loop talks to an `Engine` for the parts that differ between them: wrapping the model, which micro-batches
synchronise gradients, the backward pass, the optimizer step (clipping included) and the model and optimizer
files of a checkpoint. The rest (loss normalisation, the schedule, data order, logging, resume) is the loop's,
the same for every engine.

- `Replicated`: every process holds the whole model; Accelerate wraps it in DDP when there are several.
- `DeepSpeed`: DeepSpeed owns the optimizer step, clipping, loss scaling and the accumulation boundary; berth
  drives its engine directly (`backward` without DeepSpeed's 1/accumulation scaling, since berth's loss is
  already normalised, then `step` on the last micro-batch). Its checkpoints are DeepSpeed's own files.
- `FullyShard`: PyTorch's `fully_shard` (FSDP2) applied by berth, one group per transformer layer, the layer
  classes read from the model (`_no_split_modules`), the rest (embeddings, tied output matrix, heads) in the
  root group. It runs on CUDA (NCCL) and on CPU (gloo), so the same code is tested here. Checkpoints and
  exports use the gathered (full) state dict, in the same safetensors files as `Replicated`.

Every engine gives stages the whole weights (`full_state_dict`, `load_full_state_dict`) for best/ and exports.
What an engine cannot read from the model's forward, the stage says in `ShardingHints`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from berth.core.errors import BerthError
from berth.runtime.config import TrainConfig

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own checkpoint files, inside a berth checkpoint
DEEPSPEED_TAG = "state"


@dataclass(frozen=True)
class ShardingHints:
    """What a sharding engine cannot see by running the model's forward, told by the stage that built it."""

    # (module, weights): weights a module's forward uses that belong to another module (the masked-only MLM head
    # cuts the tied output matrix); ZeRO-3 gathers them with that module.
    external_parameters: Sequence[tuple[nn.Module, Sequence[nn.Parameter]]] = ()
    # Methods of the root module besides forward that use its weights; FSDP2 gathers them around these too.
    forward_methods: tuple[str, ...] = ()


class Engine(Protocol):
    """What the loop needs from an engine (see the module docstring)."""

    name: str  # for the log line that reports the global batch: "DDP", "DeepSpeed ZeRO-2", "FSDP2"
    # Whether its checkpoints hold whole (unsharded) weights and optimizer state, which another number of
    # processes can load; DeepSpeed's hold one optimizer shard per process.
    elastic: bool

    def wrap(self, model: nn.Module, hints: ShardingHints) -> nn.Module:
        """Before the optimizer is built: shard the model where the engine does it itself (FSDP2)."""

    def prepare(
        self, acc: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]: ...

    def micro_batch(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: gradients are synchronised on the last one only."""

    def backward(self, model: nn.Module, loss: torch.Tensor, last: bool) -> None:
        """`loss` is this process's share of the step's mean loss (already normalised over every process and
        micro-batch)."""

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> torch.Tensor:
        """Clip, step and clear gradients; returns the gradient norm before clipping (a 0-d tensor)."""

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        """Write the model and optimizer files of a checkpoint into `directory` (called on every process)."""

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None: ...

    def full_state_dict(self, model: nn.Module) -> dict[str, Any]:
        """The whole state dict of the model as trained, keyed as the unwrapped module's. Called on every
        process; only the main process's copy is complete."""

    def load_full_state_dict(self, model: nn.Module, weights: dict[str, Any]) -> None:
        """Load whole weights (every process has them) into the model as trained; missing or extra keys raise."""


def requested_engine() -> str:
    """The engine an `accelerate launch` config asks for, from the environment it sets: ddp, deepspeed, fsdp."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return "ddp"


def build_engine(acc: Accelerator, train: TrainConfig) -> Engine:
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeed(acc, train)
    if requested_engine() == "fsdp":
        if acc.num_processes > 1:
            return FullyShard(acc)
        logger.warning("the launch asks for FSDP with one process: there is nothing to shard over; training unsharded")
    return Replicated(acc)


# -- replicated: one process or DDP --------------------------------------------------------------------------


class Replicated:
    elastic = True

    def __init__(self, acc: Accelerator):
        self.acc = acc
        self.name = "one process" if acc.distributed_type == DistributedType.NO else "DDP"

    def wrap(self, model: nn.Module, hints: ShardingHints) -> nn.Module:
        return model

    def prepare(
        self, acc: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        return acc.prepare(model, optimizer)

    def micro_batch(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.acc.no_sync(model)

    def backward(self, model: nn.Module, loss: torch.Tensor, last: bool) -> None:
        # DDP averages gradients over processes; the loss is a share of the global mean, hence the factor.
        self.acc.backward(loss * self.acc.num_processes)

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> torch.Tensor:
        norm = self.acc.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.as_tensor(norm).detach()

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        if self.acc.is_main_process:
            inner = self.acc.unwrap_model(model)
            save_model(inner, str(directory / MODEL_FILE))
            torch.save(by_name(optimizer.state_dict(), optimizer, inner), directory / OPTIMIZER_FILE)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        inner = self.acc.unwrap_model(model)
        weights = load_file(str(directory / MODEL_FILE))
        missing, unexpected = inner.load_state_dict(weights, strict=False)
        # safetensors' save_model writes a tied matrix under one of its names (FSDP2's file under both)
        written = {name for pair in tied_pairs(inner) if any(n in weights for n in pair) for name in pair}
        missing = [k for k in missing if k not in written]
        if missing or unexpected:
            raise RuntimeError(f"{directory / MODEL_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(by_index(state, optimizer, inner))

    def full_state_dict(self, model: nn.Module) -> dict[str, Any]:
        return self.acc.get_state_dict(model)

    def load_full_state_dict(self, model: nn.Module, weights: dict[str, Any]) -> None:
        self.acc.unwrap_model(model).load_state_dict(weights)


# -- DeepSpeed ZeRO ------------------------------------------------------------------------------------------


class DeepSpeed:
    """DeepSpeed owns the step: clipping (`gradient_clipping`), loss scaling, the accumulation boundary and the
    optimizer state's partitioning. berth writes the batch sizes and clipping of its train section into the
    DeepSpeed config, so the launch config's values for them do not matter."""

    elastic = False

    def __init__(self, acc: Accelerator, train: TrainConfig):
        self.acc = acc
        # DeepSpeed logs to stdout; berth keeps stdout for results and logs to stderr
        for handler in logging.getLogger("DeepSpeed").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)
        plugin = acc.state.deepspeed_plugin
        self.stage = int(plugin.zero_stage)
        self.name = f"DeepSpeed ZeRO-{self.stage}"
        config = plugin.deepspeed_config
        config.update(
            train_micro_batch_size_per_gpu=train.batch_size,
            gradient_accumulation_steps=train.grad_accum,
            train_batch_size=train.batch_size * train.grad_accum * acc.num_processes,
            gradient_clipping=train.max_grad_norm,
        )
        if self.stage == 3:
            # the export and best/ need the whole weights gathered on the main process
            config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
            # Accelerate tells transformers that ZeRO-3 is on, and transformers then builds every model already
            # partitioned (zero.Init), with another initialisation and no way to set a weight afterwards (the
            # padding rows of the output bias). berth builds the model whole, as every other engine does, and
            # DeepSpeed partitions it when it takes it: the same initial weights whatever the engine.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()

    def wrap(self, model: nn.Module, hints: ShardingHints) -> nn.Module:
        if self.stage == 3:
            import deepspeed

            for owner, params in hints.external_parameters:
                for param in params:
                    deepspeed.zero.register_external_parameter(owner, param)
        return model

    def prepare(
        self, acc: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        return acc.prepare(model, optimizer)

    def micro_batch(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, model: nn.Module, loss: torch.Tensor, last: bool) -> None:
        # DeepSpeed averages gradients over processes like DDP; berth's loss already counts the micro-batches,
        # so DeepSpeed must not divide by the accumulation steps again.
        model.set_gradient_accumulation_boundary(last)  # type: ignore[operator]
        model.backward(loss * self.acc.num_processes, scale_wrt_gas=False)  # type: ignore[operator]

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> torch.Tensor:
        model.step()  # type: ignore[operator]  # clipping, the optimizer step, zeroing the gradients
        norm = model.get_global_grad_norm()  # type: ignore[operator]
        return torch.as_tensor(-1.0 if norm is None else norm, dtype=torch.float32)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        model.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)  # type: ignore[operator]

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        folder = directory / DEEPSPEED_DIR
        path, _ = model.load_checkpoint(  # type: ignore[operator]
            str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint to resume from")

    def full_state_dict(self, model: nn.Module) -> dict[str, Any]:
        """The weights as trained: under bf16/fp16 DeepSpeed's module holds 16-bit copies and the optimizer the
        fp32 masters, which are what the other engines export; each parameter's master is gathered (a collective
        under ZeRO-3, called in the same order on every process), buffers come from the module's state dict."""
        # ZeRO-3: gathered (stage3_gather_16bit_weights_on_model_save) onto the main process, None elsewhere
        weights = self.acc.get_state_dict(model) or {}
        if self.acc.mixed_precision == "no":
            return weights
        from deepspeed.utils import safe_get_full_fp32_param

        masters: dict[int, torch.Tensor] = {}
        for name, param in self.acc.unwrap_model(model).named_parameters(remove_duplicate=False):
            if id(param) not in masters:
                master = safe_get_full_fp32_param(param)
                if master is None:
                    raise RuntimeError(f"DeepSpeed holds no fp32 master weight for {name}")
                masters[id(param)] = master.detach().cpu()
            if name in weights:
                weights[name] = masters[id(param)].clone()  # a copy per name: tied names share no storage
        return weights

    def load_full_state_dict(self, model: nn.Module, weights: dict[str, Any]) -> None:
        inner = self.acc.unwrap_model(model)
        if self.stage != 3:
            inner.load_state_dict(weights)
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(inner.parameters()), modifier_rank=0):
            if self.acc.is_main_process:
                inner.load_state_dict(weights)


# -- FSDP2 ---------------------------------------------------------------------------------------------------


def layer_classes(model: nn.Module) -> set[str]:
    """Names of the blocks to shard one by one: the `_no_split_modules` of every transformers model inside."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP group: those of a layer class that share no parameter with the
    rest of the model (BERT's embeddings hold the matrix tied to the MLM output; it stays in the root group)."""
    classes = layer_classes(model)
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    units = []
    for module in model.modules():
        if module is model or type(module).__name__ not in classes:
            continue
        if all(owners[id(p)] == 1 for p in module.parameters()):
            units.append(module)
    if not units:
        raise ValueError(f"no module of the classes {sorted(classes)} to shard in {type(model).__name__}")
    return units


class FullyShard:
    elastic = True

    def __init__(self, acc: Accelerator):
        self.acc = acc
        self.name = "FSDP2"
        version = os.environ.get("FSDP_VERSION", "2")
        if version != "2":
            logger.warning("the launch config asks for FSDP version %s; berth shards with FSDP2 (fully_shard)", version)
        self.reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard")
        # Under an FSDP launch transformers loads checkpoints onto the meta device on every process but the first,
        # for FSDP1 to copy the weights over; berth builds the model whole on every process and shards it
        # itself, so the weights must really be loaded everywhere (BERT-sized models fit each process's memory).
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        if acc.mixed_precision == "fp16":
            # berth runs FSDP2's backward itself, past Accelerate's GradScaler, and fp16 without loss scaling
            # underflows gradients silently
            raise BerthError(
                "FSDP2 with fp16 has no loss scaling in berth; set train.precision=bf16 (Ampere GPUs and newer) or "
                "fp32, or launch with a DeepSpeed or DDP config for fp16"
            )
        dtype = {"bf16": torch.bfloat16}.get(acc.mixed_precision)
        # weights computed in the low precision, gradients reduced and the optimizer stepped in fp32
        self.policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)

    def wrap(self, model: nn.Module, hints: ShardingHints) -> nn.Module:
        units = shard_units(model)
        names = "/".join(sorted({type(u).__name__ for u in units}))
        for unit in units:
            fully_shard(unit, reshard_after_forward=self.reshard, mp_policy=self.policy)
        fully_shard(model, reshard_after_forward=self.reshard, mp_policy=self.policy)
        for method in hints.forward_methods:
            register_fsdp_forward_method(model, method)
        if self.acc.is_main_process:
            logger.info("FSDP2: one group per %s (%d) and the root", names, len(units))
        return model

    def prepare(
        self, acc: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        return model, optimizer  # sharded by `wrap`; Accelerate would wrap it in DDP on CPU

    def micro_batch(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return gradient_sync(model, last)

    def backward(self, model: nn.Module, loss: torch.Tensor, last: bool) -> None:
        (loss * self.acc.num_processes).backward()  # FSDP averages the reduced gradients like DDP

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor over the shards
        return full.detach()

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        state = get_optimizer_state_dict(model, optimizer, options=options)
        if self.acc.is_main_process:
            save_file(untied(cast(dict[str, torch.Tensor], weights)), str(directory / MODEL_FILE))
            torch.save(state, directory / OPTIMIZER_FILE)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        options = StateDictOptions(full_state_dict=True)
        weights: dict[str, Any] = load_file(str(directory / MODEL_FILE))
        for name, twin in tied_pairs(model):  # written once by a one-process run (safetensors' save_model)
            if twin in weights and name not in weights:
                weights[name] = weights[twin]
        set_model_state_dict(model, weights, options=options)
        state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, optimizer, state, options=options)

    def full_state_dict(self, model: nn.Module) -> dict[str, Any]:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state_dict(self, model: nn.Module, weights: dict[str, Any]) -> None:
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    assert isinstance(model, FSDPModule)
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def untied(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses two names for one storage (tied matrices): give each name its own copy."""
    seen: set[int] = set()
    out = {}
    for name, tensor in weights.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = (tensor.clone() if pointer in seen else tensor).contiguous()
        seen.add(pointer)
    return out


# -- whole checkpoints that any process count loads ---------------------------------------------------------------


def tied_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(name, first name) of every parameter that is a second name for another (tied matrices)."""
    first: dict[int, str] = {}
    pairs = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            pairs.append((name, first[id(param)]))
        else:
            first[id(param)] = name
    return pairs


def _names_in_order(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The parameter names in the optimizer's own order (its state dict numbers parameters in this order)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def by_name(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter names instead of positions: the form FSDP2's full optimizer
    state dict takes, so a checkpoint of one process and one of FSDP2 load into each other."""
    names = _names_in_order(optimizer, model)
    return {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }


def by_index(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """The inverse of `by_name`, for `optimizer.load_state_dict` (a state dict keyed by position passes)."""
    if all(isinstance(key, int) for key in state["state"]):
        return state
    index = {name: i for i, name in enumerate(_names_in_order(optimizer, model))}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]],
    }
