"""Two classification runs compared document by document: McNemar's exact test on what one gets right and the other
wrong, on the natural test split, its texts longer than one window, and each robustness evaluation.

    .venv/bin/python bench/paired_bench.py RUN_A RUN_B [--aggregation margin]

Reads each run's test_predictions.jsonl (the exported aggregation) and the `right` strings of `robustness` and
`robustness_in_domain` in eval_results.json (every run draws the same documents, in the same order). "+a / -b":
A is right on a documents B gets wrong, and wrong on b that B gets right; p is two-sided.
"""

from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path

from berth.finetune.hidden_text import POSITIONS


def mcnemar(a: int, b: int) -> float:
    """Exact two-sided p of a and b discordant pairs (binomial, 1/2)."""
    n = a + b
    return min(1.0, 2 * sum(comb(n, i) for i in range(min(a, b) + 1)) / 2**n) if n else 1.0


def compare(name: str, a: list[bool], b: list[bool]) -> None:
    wins = sum(x and not y for x, y in zip(a, b, strict=True))
    losses = sum(y and not x for x, y in zip(a, b, strict=True))
    print(f"{name:28s} +{wins} / -{losses}  (p = {mcnemar(wins, losses):.3f}, {len(a)} documents)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--aggregation", default="margin", help="whose robustness figures to compare")
    args = parser.parse_args()
    runs = (args.run_a, args.run_b)
    predictions = [[json.loads(line) for line in (run / "test_predictions.jsonl").open()] for run in runs]
    right = [[row["label"] == row["reference"] for row in rows] for rows in predictions]
    compare("natural test", *right)
    long = [
        [r for r, row in zip(rights, rows, strict=True) if row["windows"] > 1]
        for rights, rows in zip(right, predictions, strict=True)
    ]
    compare("natural test, long", *long)
    found = [json.loads((run / "eval_results.json").read_text()) for run in runs]
    for key in ("robustness", "robustness_in_domain"):
        if not all(key in f and "right" in f[key] for f in found):
            continue
        marks = [[c == "1" for c in f[key]["right"][args.aggregation]] for f in found]
        compare(f"{key}, all", *marks)
        end = POSITIONS.index("end")  # each text's documents come in POSITIONS order
        compare(f"{key}, end", *(m[end :: len(POSITIONS)] for m in marks))


if __name__ == "__main__":
    main()
