"""berth's metrics as evaluate modules loaded from this folder: `evaluate.load("accuracy")` fetches its script
from the hub, which fails offline and on clusters without internet."""

from __future__ import annotations

import functools
from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent


@functools.cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    path = METRICS_DIR / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in METRICS_DIR.glob("*.py") if p.stem != "__init__")
        raise ValueError(f"no metric {name!r}; berth ships {', '.join(known)}")
    return evaluate.load(str(path))
