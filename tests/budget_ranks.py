"""A budgeted pretraining run whose second process sees its clock run 1.5x fast: the processes time their steps
differently, as on machines of unequal speed, and must still plan one count. tests/test_budget.py launches it.

    python tests/budget_ranks.py CONFIG.yaml [section.key=value ...]
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

from berth.app.cli import configure_logging
from berth.core.config import load_config
from berth.core.process import end_launched_process
from berth.pretrain.config import PretrainConfig
from berth.pretrain.train import pretrain
from berth.runtime import budget as budget_module
from berth.runtime import loop as loop_module

if __name__ == "__main__":
    configure_logging()
    if os.environ.get("RANK") == "1":
        fast = SimpleNamespace(perf_counter=lambda: 1.5 * time.perf_counter())
        loop_module.time = budget_module.time = fast  # type: ignore[assignment]
    pretrain(load_config(PretrainConfig, sys.argv[1], sys.argv[2:]))
    end_launched_process(0)  # as berth's command line ends: no abort from gloo's threads at exit
