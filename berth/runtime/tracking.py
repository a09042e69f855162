"""Metric logging: always metrics.jsonl in the run directory, plus Accelerate trackers (wandb, tensorboard)."""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """One JSON object a line. On resume, lines past the resumed step are dropped so the file stays one run."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def configure_wandb() -> str:
    """wandb runs offline (files under <output_dir>/wandb, `wandb sync` later) unless the user is logged in and
    WANDB_MODE does not say otherwise. Returns the mode."""
    if "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "online" if wandb_logged_in() else "offline"
    return os.environ["WANDB_MODE"]
