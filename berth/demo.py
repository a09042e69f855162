"""The main job on the embedded default corpus: every stage in order, each one the same command a user runs.

Each stage reuses what an earlier demo built with the same config, so a second run is quick.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from berth.config import load_config

logger = logging.getLogger(__name__)


def configs_dir() -> Path:
    """The configs/ folder shipped beside the packages (the repository root in an editable install)."""
    return Path(__file__).resolve().parent.parent / "configs"


def run_demo(output_dir: str | Path = "runs/demo", overrides: Sequence[str] = ()) -> str:
    """Run the pipeline into output_dir and return the printed summary."""
    from pretrain.config import PretrainConfig
    from pretrain.prepare import format_stats, prepare
    from tokenizer.config import TokenizerJobConfig
    from tokenizer.train import format_summary, load_tokenizer, train_tokenizer

    out = Path(output_dir)
    configs = configs_dir()
    tok_cfg = load_config(TokenizerJobConfig, configs / "tokenizer" / "zh.yaml", [f"output_dir={out / 'tokenizer'}"])
    logger.info("stage 1/2: tokenizer (berth tokenizer train configs/tokenizer/zh.yaml)")
    summary = train_tokenizer(tok_cfg, reuse=True)

    logger.info("stage 2/2: pretraining data (berth prepare configs/pretrain/mini_zh.yaml)")
    pre_cfg = load_config(
        PretrainConfig,
        configs / "pretrain" / "mini_zh.yaml",
        [
            f"output_dir={out / 'pretrain'}",
            f"tokenizer.path={out / 'tokenizer'}",
            f"data.cache_dir={out / 'cache'}",
            *overrides,
        ],
    )
    prepared = prepare(pre_cfg, load_tokenizer(tok_cfg.output_dir))
    return f"{format_summary(summary)}\n\n{format_stats(prepared)}"
