"""How close `train.budget_minutes` lands to its budget: the demo's pretraining recipes, one after the other.

Each recipe pretrains the demo's encoder (`configs/pretrain/mini_zh.yaml`) for `--minutes` of optimizer steps, with
no evaluations, and reports the budget's fits (`state.json`'s `fits`) and how far the steps' time (`step_seconds`)
ended from the budget. `--hog-after S` starts a busy process S seconds into each run (a core's worth of other work,
as on a shared machine), so the steps slow after the warm-up probe; `--probe-only` also runs each recipe with the
count fixed by the probe alone (REFIT_AT emptied: the budget before refits), side by side. Runs are not reused:
a run folder left in `--out` is refused (as `berth pretrain` refuses it); the tokenizer and data cache are.

    .venv/bin/python bench/budget_bench.py --out runs/budget --minutes 4
    .venv/bin/python bench/budget_bench.py --out runs/budget --minutes 4 --recipes "mlm 15%" --hog-after 90 --probe-only
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

from berth.core.config import load_config
from berth.pretrain.config import PretrainConfig
from berth.pretrain.train import pretrain
from berth.runtime import budget as budget_module
from berth.runtime.checkpoint import list_checkpoints
from berth.tokenizer.config import TokenizerJobConfig
from berth.tokenizer.train import train_tokenizer

RECIPES = {
    "mlm 15%": [],
    "mlm 30%": ["data.mask_prob=0.3"],
    "rtd": ["data.objective=rtd"],
    "mlm 15% reviews only": ["corpus.sources=[reviews_sentiment:train]"],
}


def run_one(out: Path, name: str, minutes: float, hog_after: float, probe_only: bool) -> dict:
    tag = name.replace(" ", "-").replace("%", "") + ("-hog" if hog_after else "") + ("-probe" if probe_only else "")
    run = out / tag
    overrides = [f"output_dir={run}", f"tokenizer.path={out / 'tokenizer'}", f"data.cache_dir={out / 'cache'}"]
    overrides += [f"train.budget_minutes={minutes}", "train.max_steps=100000", "train.eval_every=0"]
    overrides += ["train.save_every=100000", "train.progress_bar=false", *RECIPES[name]]
    cfg = load_config(PretrainConfig, "configs/pretrain/mini_zh.yaml", overrides)
    refits, hog = budget_module.REFIT_AT, None

    def start_hog() -> None:
        nonlocal hog
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    timer = threading.Timer(hog_after, start_hog) if hog_after else None
    try:
        if probe_only:
            budget_module.REFIT_AT = ()
        if timer:
            timer.start()
        pretrain(cfg)
    finally:
        budget_module.REFIT_AT = refits
        if timer:
            timer.cancel()
        if hog:
            hog.kill()
            hog.wait()
    state = json.loads((list_checkpoints(run)[-1] / "state.json").read_text())
    return {
        "recipe": name,
        "hog_after": hog_after,
        "refits": not probe_only,
        "fits": state["fits"],
        "steps": state["step"],
        "step_minutes": state["step_seconds"] / 60,
        "off": state["step_seconds"] / (minutes * 60) - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/budget")
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--hog-after", type=float, default=0.0, help="seconds into each run to start a busy process")
    parser.add_argument("--probe-only", action="store_true", help="also run each recipe without refits")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    tokenizer = load_config(TokenizerJobConfig, "configs/tokenizer/zh.yaml", [f"output_dir={out / 'tokenizer'}"])
    train_tokenizer(tokenizer, reuse=True)
    rows = []
    for name in args.recipes:
        for probe_only in (False, True) if args.probe_only else (False,):
            rows.append(run_one(out, name, args.minutes, args.hog_after, probe_only))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| recipe | busy from | refits | fits (after step: count) | steps | step minutes | off the budget |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fits = ", ".join(f"{int(step)}: {int(count):,}" for step, count, _ in r["fits"])
        hog = f"{r['hog_after']:g} s" if r["hog_after"] else "-"
        print(
            f"| {r['recipe']} | {hog} | {'yes' if r['refits'] else 'no'} | {fits} | {r['steps']:,} | "
            f"{r['step_minutes']:.2f} | {r['off']:+.1%} |"
        )


if __name__ == "__main__":
    main()
