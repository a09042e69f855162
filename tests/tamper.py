"""Mutations of a written checkpoint, for resume tests to prove that they fail when resume loses something: the
data position (the step inside the epoch) or the optimizer's moments. The manifest is kept consistent, so the
checkpoint still passes berth's integrity checks and the loss shows only in the run that follows."""

import json
from pathlib import Path
from typing import Any

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


def rewrite(step_dir: Path, name: str, data: bytes) -> None:
    (step_dir / name).write_bytes(data)
    manifest = step_dir / "manifest.json"
    sizes = json.loads(manifest.read_text())
    sizes[name] = len(data)
    manifest.write_text(json.dumps(sizes, indent=2) + "\n")


def shift_data_position(step_dir: Path) -> None:
    """Resume one step further into the epoch than where the run stopped (the step count stays)."""
    state = json.loads((step_dir / "state.json").read_text())
    state["epoch_step"] += 1
    rewrite(step_dir, "state.json", (json.dumps(state, indent=2) + "\n").encode())


def _zero_moments(tree: Any) -> int:
    count = 0
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in MOMENTS and isinstance(value, torch.Tensor):
                value.zero_()
                count += 1
            else:
                count += _zero_moments(value)
    elif isinstance(tree, list | tuple):
        count += sum(_zero_moments(value) for value in tree)
    return count


def forget_optimizer_moments(step_dir: Path) -> None:
    """Adam's first and second moments set to zero, as if the optimizer state had not been saved: in berth's
    optimizer.pt, or in DeepSpeed's optimizer shards (its own pickle files, read here with weights_only=False)."""
    files = [step_dir / "optimizer.pt"] if (step_dir / "optimizer.pt").is_file() else []
    files += sorted((step_dir / "deepspeed").rglob("*optim_states.pt"))
    assert files, f"no optimizer state in {step_dir}"
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=path.name == "optimizer.pt")
        assert _zero_moments(state), f"no Adam moments in {path}"
        torch.save(state, path)
        rewrite(step_dir, str(path.relative_to(step_dir)), path.read_bytes())
