"""The main job on the embedded default corpus: every stage in order, each one the same command a user runs.

Stages whose output already exists with the same resolved config are reused, so a second run is quick.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from berth.app.report import DemoRuns, duration, eval_curve, summary_table, timing_table, write_report
from berth.core.config import dump_config, load_config
from berth.core.layout import CONFIG_FILENAME, FINAL_DIR
from berth.core.vocab import load_tokenizer
from berth.finetune.config import FinetuneConfig
from berth.finetune.train import finetune
from berth.pretrain.config import PretrainConfig
from berth.pretrain.prepare import format_stats, prepare
from berth.pretrain.train import pretrain
from berth.runtime.checkpoint import checkpoint_dir
from berth.tokenizer.config import TokenizerJobConfig
from berth.tokenizer.train import format_summary, is_built, train_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoBudget:
    """How much each stage trains: the default fits 20 minutes on 2 CPU cores, quick about 2. The random-init
    baselines train exactly as their pretrained runs; `scratch` only turns off the extra evaluations the report
    reads from the pretrained run alone (the TF-IDF yardstick is the same for both)."""

    pretrain: tuple[str, ...]
    sentiment: tuple[str, ...]
    ner: tuple[str, ...]
    scratch: tuple[str, ...] = ()
    note: str = ""  # what this budget cuts against the shipped configs, for the report


FULL = DemoBudget(
    pretrain=("train.max_steps=1400", "train.eval_every=200", "train.eval_batches=40", "train.save_every=1400"),
    sentiment=("train.max_steps=400",),
    ner=("train.max_steps=250", "train.eval_every=125"),
    scratch=("train.yardstick=false", "train.compare_truncation=false", "data.robustness_docs=0"),
    note=(
        "The demo trains less than the shipped configs, to fit 20 minutes on 2 CPU cores: pretraining 1,400 of "
        "`mini_zh.yaml`'s 3,800 steps; sentiment 400 steps (about half an epoch of reviews and hidden-text windows) "
        "instead of 3 epochs; NER 250 steps instead of 3 epochs. The random-init runs train exactly as the "
        "pretrained ones and skip only the evaluations this report reads from the pretrained run (the yardstick, "
        "truncation, hidden reviews)."
    ),
)
QUICK = DemoBudget(
    pretrain=(
        "model.size=tiny",
        "train.max_steps=30",
        "train.warmup_steps=5",
        "train.eval_every=15",
        "train.eval_batches=4",
        "train.save_every=30",
        "train.log_every=5",
    ),
    sentiment=("data.max_examples=300", "train.max_steps=12", "train.eval_every=6", "data.robustness_docs=100"),
    ner=("data.max_examples=200", "train.max_steps=12", "train.eval_every=6"),
    scratch=FULL.scratch,
)


def built_with(run: Path, cfg: object, source: Path | None = None) -> bool:
    """True when `run` holds a finished export made with exactly this config and, when given, after the
    `source` file it was built from was last written (a fine-tuning run is stale once its encoder is retrained)."""
    saved, done = run / CONFIG_FILENAME, run / FINAL_DIR / "config.json"
    if not (done.is_file() and saved.is_file() and saved.read_text() == dump_config(cfg)):
        return False
    return source is None or (source.is_file() and done.stat().st_mtime >= source.stat().st_mtime)


def start_afresh(run: Path) -> None:
    """The demo owns its run directories: a stage it builds again drops the checkpoints of the run it replaces
    (a fresh start is refused where an earlier run's checkpoints are)."""
    stale = checkpoint_dir(run)
    if stale.is_dir():
        logger.info("removing %s: this stage is built again", stale)
        shutil.rmtree(stale)


def run_demo(output_dir: str | Path = "runs/demo", overrides: Sequence[str] = (), quick: bool = False) -> str:
    """Run the pipeline into output_dir and return the printed summary (the report is output_dir/report.md)."""
    start = time.perf_counter()
    out = Path(output_dir)
    budget = QUICK if quick else FULL
    runs = DemoRuns(
        pretrain=out / "pretrain",
        sentiment=out / "sentiment",
        sentiment_scratch=out / "sentiment_scratch",
        ner=out / "ner",
        ner_scratch=out / "ner_scratch",
    )
    commands: list[str] = []
    timings: list[tuple[str, float]] = []  # (stage, minutes of this demo's wall clock; ~0 when reused)
    clock = [time.perf_counter()]

    def stage(number: int, command: str) -> None:
        commands.append(command)
        logger.info("stage %d/7: %s", number, command)

    def timed(name: str) -> None:
        """Close the stage that just ran: its minutes, for the report's table."""
        now = time.perf_counter()
        timings.append((name, (now - clock[0]) / 60))
        clock[0] = now

    tok_cfg = load_config(TokenizerJobConfig, "configs/tokenizer/zh.yaml", [f"output_dir={out / 'tokenizer'}"])
    stage(1, f"berth tokenizer train configs/tokenizer/zh.yaml output_dir={out / 'tokenizer'}")
    reused: list[str] = ["tokenizer"] if is_built(tok_cfg) else []
    summary = train_tokenizer(tok_cfg, reuse=True)
    timed("1 tokenizer")

    shared = [f"tokenizer.path={out / 'tokenizer'}", f"data.cache_dir={out / 'cache'}"]
    pre_overrides = [f"output_dir={runs.pretrain}", *shared, *budget.pretrain, *overrides]
    pre_cfg = load_config(PretrainConfig, "configs/pretrain/mini_zh.yaml", pre_overrides)
    stage(2, f"berth prepare configs/pretrain/mini_zh.yaml {' '.join(shared)}")
    prepared = prepare(pre_cfg, load_tokenizer(tok_cfg.output_dir))
    timed("2 prepare")

    stage(3, f"berth pretrain configs/pretrain/mini_zh.yaml {' '.join(pre_overrides)}")
    if built_with(runs.pretrain, pre_cfg):
        logger.info("reusing the pretrained model in %s (same config)", runs.pretrain / FINAL_DIR)
        reused.append("pretraining")
    else:
        start_afresh(runs.pretrain)
        pretrain(pre_cfg)
    timed("3 pretrain")

    jobs = [
        (4, "reviews_sentiment", runs.sentiment, budget.sentiment, False),
        (5, "reviews_sentiment", runs.sentiment_scratch, (*budget.sentiment, *budget.scratch), True),
        (6, "peoples_daily_ner", runs.ner, budget.ner, False),
        (7, "peoples_daily_ner", runs.ner_scratch, budget.ner, True),
    ]
    for number, name, run, extra, scratch in jobs:
        ft_overrides = [
            f"output_dir={run}",
            f"model.init={runs.pretrain / FINAL_DIR}",
            *(["model.from_scratch=true"] if scratch else []),
            *extra,
        ]
        ft_cfg = load_config(FinetuneConfig, f"configs/finetune/{name}.yaml", ft_overrides)
        stage(number, f"berth finetune configs/finetune/{name}.yaml {' '.join(ft_overrides)}")
        if built_with(run, ft_cfg, runs.pretrain / FINAL_DIR / "model.safetensors"):
            logger.info("reusing %s (same config)", run / FINAL_DIR)
            reused.append(run.name)
        else:
            start_afresh(run)
            finetune(ft_cfg)
        timed(f"{number} finetune {run.name}")

    minutes = (time.perf_counter() - start) / 60
    report = write_report(out, runs, commands, minutes, reused, timings, budget.note)
    curve = "\n".join(f"  step {s:>5}: {100 * a:.1f}%" for s, a in eval_curve(runs.pretrain, "eval_mlm_accuracy"))
    return (
        f"{format_summary(summary)}\n\n{format_stats(prepared)}\n\n"
        f"Held-out masked-token accuracy during pretraining:\n{curve}\n\n"
        f"{summary_table(runs)}\n\nReport: {report} (this run: {duration(minutes)})\n\n"
        f"Where the time went:\n{timing_table(timings, reused)}"
    )
