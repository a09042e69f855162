"""Checkpoints with everything exact resume needs, in formats that run no code when read, the last K kept.

A checkpoint directory `checkpoints/step-N/` holds:

    model.safetensors       the whole weights (gathered from the shards under FSDP2)
    optimizer.pt            the optimizer state (whole), read back with torch.load(weights_only=True)
    deepspeed/              instead of the two above under DeepSpeed: its own files, one per process
    scheduler.json          the LR schedule's counters
    rng-<rank>.json         each process's Python and NumPy RNG states
    rng-<rank>.safetensors  each process's torch CPU (and CUDA) RNG states
    state.json              the loop's counters and data position
    config.yaml             the resolved config of the run
    manifest.json           every file's size, written last

Nothing berth writes is pickled, so `train.resume=<a directory someone sent you>` cannot run their code; only
DeepSpeed's own files are read with pickle (by DeepSpeed), as DeepSpeed checkpoints always are. A checkpoint is written
under a temporary name, flushed, and renamed into place (`berth.core.files`); before one is used, its manifest,
JSON and YAML files and safetensors headers are checked, and `resume=auto` falls back to the newest whole one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from berth.core.errors import BerthError
from berth.core.files import TMP_PREFIX, replace_dir
from berth.core.layout import CONFIG_FILENAME
from berth.runtime.engines import Engine

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
SCHEDULER_FILE = "scheduler.json"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints in place (step-N, with state.json), oldest first; whole or not (see `check_checkpoint`)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# -- random number generators: plain data, not pickles -----------------------------------------------------------


def rng_states() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This process's RNG states: Python's and NumPy's as JSON, torch's as tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state(legacy=True))
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return plain, tensors


def set_rng_states(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# -- saving ------------------------------------------------------------------------------------------------------


def save_checkpoint(
    accelerator: Accelerator,
    engine: Engine,
    output_dir: str | Path,
    step: int,
    objects: dict[str, Any],
    state: dict[str, Any],
    config_text: str,
    keep: int,
) -> Path:
    """Write checkpoint step-N of `objects` (model, optimizer, scheduler as prepared) and the loop's
    `state`; keep the newest `keep`. A failed write (a full disk) removes its partial directory and stops with one
    line; the checkpoints already there are untouched."""
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"  # one name on every process: each writes its RNG files into it
    rank = accelerator.process_index
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        plain, tensors = rng_states()
        (tmp / f"rng-{rank}.json").write_text(json.dumps(plain))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"rng-{rank}.safetensors"))
        engine.save(objects["model"], objects["optimizer"], tmp)  # collective under the sharded engines
        if accelerator.is_main_process:
            (tmp / SCHEDULER_FILE).write_text(json.dumps(objects["scheduler"].state_dict()))
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            (tmp / CONFIG_FILENAME).write_text(config_text)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MANIFEST_FILE).write_text(json.dumps(sizes, indent=2) + "\n")
            replace_dir(tmp, final)  # flushed to disk, then renamed into place
            for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = [p.name for p in list_checkpoints(output_dir) if p != final]
        left = f"; {kept[-1]} is intact" if kept else ""
        raise BerthError(f"cannot write checkpoint {final}: {exc.strerror or exc}{left}") from None
    accelerator.wait_for_everyone()
    return final


# -- checking and loading ----------------------------------------------------------------------------------------


def check_checkpoint(path: Path) -> str:
    """'' when the checkpoint is whole, else why not (a missing or cut file, unreadable JSON, YAML or safetensors)."""
    try:
        sizes = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (the save did not finish)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{MANIFEST_FILE} is not valid JSON"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, not the {size} it was written with"
    for name in sizes:
        try:
            if name.endswith(".json"):
                json.loads((path / name).read_text())
            elif name.endswith((".yaml", ".yml")):
                yaml.safe_load((path / name).read_text())
            elif name.endswith(".safetensors"):
                with safe_open(str(path / name), framework="pt") as handle:
                    handle.keys()
        except (json.JSONDecodeError, UnicodeDecodeError, yaml.YAMLError):
            return f"{name} cannot be parsed"
        except Exception as exc:  # safetensors reports a bad header with exception types of its own
            return f"{name} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return ""


def load_checkpoint(
    accelerator: Accelerator,
    engine: Engine,
    path: str | Path,
    objects: dict[str, Any],
    current: dict[str, Any],
    sections: tuple[str, ...],
) -> dict[str, Any]:
    """Load the checkpoint into `objects` (model, optimizer, scheduler as prepared) and this process's RNGs, and
    return its loop state, after checking that the config `sections` (those whose change makes the checkpoint
    meaningless for this run) are unchanged."""
    path = Path(path)
    differences = config_differences((path / CONFIG_FILENAME).read_text(), current, sections)
    if differences:
        raise BerthError(f"refusing to resume from {path}: the config changed: {'; '.join(differences)}")
    written_by = saved_processes(path)
    processes, rank = accelerator.num_processes, accelerator.process_index
    if written_by != processes and not engine.elastic:
        raise BerthError(
            f"refusing to resume from {path}: {engine.name} wrote it with {written_by} processes, one optimizer "
            f"shard each, and this run has {processes}; resume it with {written_by} processes, or convert it with "
            "DeepSpeed's ds_to_universal.py and start a new run from the converted weights"
        )
    engine.load(objects["model"], objects["optimizer"], path)
    objects["scheduler"].load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
    state = json.loads((path / STATE_FILE).read_text())
    if written_by == processes:
        set_rng_states(
            json.loads((path / f"rng-{rank}.json").read_text()), load_file(str(path / f"rng-{rank}.safetensors"))
        )
    else:
        # Another process count: the data of each step is the same (it is drawn by global position and each
        # example masked by its own seed), but no process continues another's random stream (dropout), so each
        # starts one drawn from the step and its rank: deterministic, not the uninterrupted run's.
        reseed(int(state["step"]) * 1_000_003 + rank)
        if accelerator.is_main_process:
            logger.info(
                "resuming a checkpoint of %d processes on %d: the same examples in the same order; dropout draws "
                "new masks from here",
                written_by,
                processes,
            )
    return state


def check_same_run(
    checkpoint: Path, saved_key: dict[str, str], saved_batch: int, data_key: dict[str, str], global_batch: int
) -> None:
    """Refuse a checkpoint whose data fingerprints (`data_key`) or global batch differ from this run's: its data
    position would point into other examples."""
    changed = [
        f"{name}: {saved_key.get(name)} -> {new}" for name, new in data_key.items() if saved_key.get(name) != new
    ]
    if changed:
        raise BerthError(
            f"refusing to resume from {checkpoint}: the data under the same config changed ({'; '.join(changed)})"
        )
    if saved_batch != global_batch:
        raise BerthError(
            f"refusing to resume from {checkpoint}: its steps took {saved_batch} units and this run's "
            f"take {global_batch} (train.batch_size x processes x train.grad_accum); keep the global batch"
        )


def saved_processes(path: Path) -> int:
    """How many processes wrote the checkpoint: one RNG file each, numbered from 0."""
    count = len(list(path.glob("rng-*.json")))
    if count == 0 or any(not (path / f"rng-{r}.json").is_file() for r in range(count)):
        raise BerthError(f"refusing to resume from {path}: its RNG files are not rng-0 .. rng-{max(count - 1, 0)}")
    return count


def reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'' -> None (fresh start); 'auto' -> the newest whole checkpoint, or None; otherwise that checkpoint.

    A fresh start where an earlier run left checkpoints is refused: its own checkpoints would overwrite and
    prune the earlier ones by step number, and a later resume=auto could pick up the other run's.
    """
    if not resume:
        found = list_checkpoints(output_dir)
        if found:
            raise BerthError(
                f"{checkpoint_dir(output_dir)} holds the checkpoints of an earlier run (newest {found[-1].name}): "
                "continue it with train.resume=auto, or delete that folder or choose another output_dir to start afresh"
            )
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        for candidate in reversed(found):
            problem = check_checkpoint(candidate)
            if not problem:
                return candidate
            logger.warning("skipping %s: %s", candidate, problem)
        if found:
            raise BerthError(
                f"{checkpoint_dir(output_dir)}: none of its {len(found)} checkpoints is whole; delete the folder to "
                "start afresh"
            )
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise BerthError(f"train.resume={resume}: not a checkpoint directory (no {STATE_FILE})")
    problem = check_checkpoint(path)
    if problem:
        raise BerthError(f"train.resume={resume}: the checkpoint is damaged: {problem}")
    return path


def config_differences(saved_text: str, current: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """'section.key: old -> new' for every difference inside `sections` ('key: old -> new' for a top-level
    value such as finetune's task)."""
    saved = yaml.safe_load(saved_text) or {}
    out = []
    for section in sections:
        old, new = saved.get(section, {}), current.get(section, {})
        if not (isinstance(old, dict) and isinstance(new, dict)):
            if old != new:
                out.append(f"{section}: {old!r} -> {new!r}")
            continue
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                out.append(f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out
