"""Atomic checkpoints with everything exact resume needs, the last K kept.

A checkpoint is Accelerate's `save_state` (model, optimizer, registered objects such as the LR scheduler,
and the RNG states of every process) plus `state.json` (step, data position, counters) and the resolved
`config.yaml`. It is written to a temporary directory and renamed into place, so a kill during a save
leaves the last good checkpoint intact and never a half-written one under a checkpoint's name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator

from berth.core.errors import BerthError
from berth.core.layout import CONFIG_FILENAME

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with state.json), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any], config_text: str, keep: int
) -> Path:
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its own RNG state here
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        (tmp / CONFIG_FILENAME).write_text(config_text)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Accelerator, path: str | Path, current: dict[str, Any], sections: tuple[str, ...]
) -> dict[str, Any]:
    """Load the checkpoint into the prepared objects and return its state, after checking that the config
    `sections` (those whose change makes the checkpoint meaningless for this run) are unchanged."""
    path = Path(path)
    differences = config_differences((path / CONFIG_FILENAME).read_text(), current, sections)
    if differences:
        raise BerthError(f"refusing to resume from {path}: the config changed: {'; '.join(differences)}")
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'' -> None (fresh start); 'auto' -> the newest checkpoint, or None; otherwise that checkpoint.

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
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise BerthError(f"train.resume={resume}: not a checkpoint directory (no {STATE_FILE})")
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
