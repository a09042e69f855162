"""Metric logging: always metrics.jsonl in the run directory, plus Accelerate trackers (wandb, tensorboard)."""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import resource
from pathlib import Path
from typing import Any

import torch

from berth.core.errors import BerthError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """One JSON object a line. On resume, lines past the resumed step are dropped so the file stays one run."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [] if resume_step is None else [r for r in read_metrics(output_dir) if r.get("step", 0) <= resume_step]
        # written beside and renamed over: a kill during the rewrite leaves the old log whole
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A cut last line (a kill or a full disk mid-write) is skipped with a warning;
    a bad line before it is an error naming it."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise BerthError(f"{path} line {number}: not a JSON record; the metrics log is damaged") from None
            logger.warning("%s: skipping its last line, cut short (%d characters)", path, len(line))
    return records


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


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """section.key -> value, as trackers (wandb, tensorboard hparams) take a config."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value) if isinstance(value, list) else value
    return out
