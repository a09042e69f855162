"""Pretraining objectives at equal time, judged downstream: what each buys over random init.

Each objective pretrains the demo's encoder (ModernBERT mini, `configs/pretrain/mini_zh.yaml`) for the same
`train.budget_minutes`; each encoder, and the same architecture from random init, is then fine-tuned on the demo's
tasks with the demo's step budgets: sentiment with all labels and with 1,000 (`data.train_examples`), and NER, each
with two fine-tuning seeds. Fine-tuning skips the evaluations that do not enter the table (yardstick, truncation,
hidden reviews). Runs one after the other; a finished run is reused when its directory holds eval_results.json
(or final/ for pretraining).

    .venv/bin/python bench/objectives_bench.py --out runs/objectives --minutes 4
    .venv/bin/python bench/objectives_bench.py --out runs/objectives-bert --architecture bert --objectives "mlm 15%" rtd
    .venv/bin/python bench/objectives_bench.py --out runs/objectives --objectives "mlm 15%" "mlm 15% reviews only"

`--architecture bert` pretrains BERT (masked LM) and ELECTRA-style BERT (replaced-token detection) instead of the
recipe's ModernBERT; random init is then the same BERT.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from berth.core.config import load_config
from berth.finetune.config import FinetuneConfig
from berth.finetune.data import load_splits
from berth.finetune.train import finetune
from berth.finetune.yardstick import tfidf_yardstick
from berth.pretrain.config import PretrainConfig
from berth.pretrain.train import pretrain
from berth.runtime.tracking import read_metrics
from berth.tokenizer.config import TokenizerJobConfig
from berth.tokenizer.train import train_tokenizer

OBJECTIVES = {
    "mlm 15%": [],
    "mlm 30%": ["data.mask_prob=0.3"],
    "rtd": ["data.objective=rtd"],
    # task-adaptive pretraining (Gururangan et al. 2020): the review training texts alone, no news
    "mlm 15% reviews only": ["corpus.sources=[reviews_sentiment:train]"],
}
TASKS = {
    # (config, metric, overrides): the demo's fine-tuning budgets (berth.app.demo.FULL)
    "sentiment": ("reviews_sentiment", "accuracy", ["train.max_steps=400"]),
    "sentiment, 1,000 labels": ("reviews_sentiment", "accuracy", ["train.max_steps=200", "data.train_examples=1000"]),
    "NER": ("peoples_daily_ner", "f1", ["train.max_steps=250", "train.eval_every=125"]),
}
# Sentiment's evaluations that the table does not read (NER has none of them).
SKIP = ["train.yardstick=false", "train.compare_truncation=false", "data.robustness_docs=0"]
SEEDS = (0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/objectives")
    parser.add_argument("--minutes", type=float, default=4.0, help="train.budget_minutes of every pretraining run")
    parser.add_argument("--objectives", nargs="*", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument(
        "--architecture", choices=["modernbert", "bert"], default="modernbert", help="model.architecture of every run"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    tokenizer = load_config(TokenizerJobConfig, "configs/tokenizer/zh.yaml", [f"output_dir={out / 'tokenizer'}"])
    train_tokenizer(tokenizer, reuse=True)
    shared = [f"tokenizer.path={out / 'tokenizer'}", f"data.cache_dir={out / 'cache'}"]
    budget = [f"train.budget_minutes={args.minutes}", "train.max_steps=100000", "train.eval_every=200"]
    budget += ["train.eval_batches=40", "train.save_every=100000", "train.progress_bar=false"]

    encoders: dict[str, Path] = {}
    pretraining: dict[str, dict] = {}
    for name in args.objectives:
        run = out / "pretrain" / name.replace(" ", "-").replace("%", "")
        if not (run / "final").is_dir():
            start = time.perf_counter()
            cfg = load_config(
                PretrainConfig,
                "configs/pretrain/mini_zh.yaml",
                [f"output_dir={run}", *shared, *budget, f"model.architecture={args.architecture}", *OBJECTIVES[name]],
            )
            pretrain(cfg)
            print(f"{name}: pretrained in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        metrics = read_metrics(run)
        steps = [m for m in metrics if "loss" in m]
        evals = [m for m in metrics if "eval_mlm_accuracy" in m]
        state = sorted((run / "checkpoints").glob("step-*"))[-1] / "state.json"
        pretraining[name] = {
            "steps": steps[-1]["step"],
            "step_minutes": json.loads(state.read_text())["step_seconds"] / 60,
            "eval_mlm_accuracy": evals[-1]["eval_mlm_accuracy"],
            "eval_rtd_accuracy": evals[-1].get("eval_rtd_accuracy"),
        }
        encoders[name] = run / "final"
    encoders["random init"] = encoders[args.objectives[0]]

    scores: dict[str, dict[str, list[float]]] = {}
    for name, init in encoders.items():
        for task, (config, metric, overrides) in TASKS.items():
            for seed in SEEDS:
                tag = f"{name}-{task}-{seed}".replace(" ", "-").replace(",", "").replace("%", "")
                run = out / "finetune" / tag
                if not (run / "eval_results.json").is_file():
                    scratch = ["model.from_scratch=true"] if name == "random init" else []
                    ft = [f"output_dir={run}", f"model.init={init}", *scratch, f"train.seed={seed}", *overrides]
                    ft += ["train.progress_bar=false", *(SKIP if config == "reviews_sentiment" else [])]
                    finetune(load_config(FinetuneConfig, f"configs/finetune/{config}.yaml", ft))
                result = json.loads((run / "eval_results.json").read_text())["test"][metric]
                scores.setdefault(name, {}).setdefault(task, []).append(result)
                print(f"{tag}: test {metric} {result:.4f}", flush=True)

    # The floor a pretrained encoder is judged against: the demo's TF-IDF yardstick on the training texts each
    # sentiment cell trains on (deterministic, so one figure per task, not one per seed).
    for task, (config, metric, overrides) in TASKS.items():
        if config == "reviews_sentiment":
            cfg = load_config(FinetuneConfig, f"configs/finetune/{config}.yaml", [*overrides, *SKIP])
            splits = load_splits(cfg.data)
            texts = {name: list(split.rows[cfg.data.text_column]) for name, split in splits.items()}
            labels = {name: list(split.rows[cfg.data.label_column]) for name, split in splits.items()}
            found = tfidf_yardstick(texts, labels, {name: [] for name in splits})["test"][metric]
            scores.setdefault("TF-IDF + logistic regression", {})[task] = [found]
    (out / "objectives.json").write_text(json.dumps({"pretraining": pretraining, "scores": scores}, indent=1))
    print("\n| pretraining | steps | step minutes | held-out MLM accuracy | " + " | ".join(TASKS) + " |")
    print("|---|---|---|---|" + "---|" * len(TASKS))
    for name, by_task in scores.items():
        done = pretraining.get(name)
        head = (
            f"{done['steps']} | {done['step_minutes']:.2f} | {100 * done['eval_mlm_accuracy']:.1f}%"
            if done
            else "- | - | -"
        )
        cells = []
        for task in TASKS:
            if task not in by_task:  # the TF-IDF row has no NER figure
                cells.append("-")
                continue
            values = by_task[task]
            base = statistics.mean(scores["random init"][task])
            gain = statistics.mean(values) - base
            shown = " / ".join(f"{100 * v:.1f}" for v in values)  # accuracy in %, F1 x 100
            cells.append(f"{shown} ({100 * gain:+.1f})" if name in encoders and name != "random init" else shown)
        print(f"| {name} | {head} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
