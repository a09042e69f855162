"""The demo's report: PNG plots and a Markdown page built from what the runs wrote to disk.

Everything here reads run directories (metrics.jsonl, eval_results.json, test_predictions.jsonl), so a report
can be rebuilt without training again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from berth.runtime.tracking import read_metrics


@dataclass(frozen=True)
class DemoRuns:
    """The run directories of one demo."""

    pretrain: Path
    sentiment: Path
    sentiment_scratch: Path
    ner: Path
    ner_scratch: Path


def results(run: Path) -> dict[str, Any]:
    path = run / "eval_results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def eval_curve(run: Path, key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in read_metrics(run) if m.get(key) is not None]


def duration(minutes: float) -> str:
    return f"{minutes:.1f} minutes" if minutes >= 1 else f"{60 * minutes:.0f} s"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_pretraining(run: Path, target: Path) -> None:
    plt = _plt()
    train = [m for m in read_metrics(run) if "mlm_loss" in m]
    evals = eval_curve(run, "eval_mlm_accuracy")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([m["step"] for m in train], [m["mlm_loss"] for m in train], label="train MLM loss")
    left.plot(*zip(*eval_curve(run, "eval_mlm_loss"), strict=True), "o-", label="held-out MLM loss")
    left.set(xlabel="optimizer step", ylabel="loss", title="Pretraining loss")
    left.legend()
    right.plot([m["step"] for m in train], [m["mlm_accuracy"] for m in train], alpha=0.5, label="train (masked tokens)")
    right.plot(*zip(*evals, strict=True), "o-", label="held-out (fixed mask)")
    right.set(xlabel="optimizer step", ylabel="accuracy", title="Masked-token accuracy")
    right.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def plot_lr(run: Path, target: Path) -> None:
    plt = _plt()
    rows = [m for m in read_metrics(run) if "lr" in m]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([m["step"] for m in rows], [m["lr"] for m in rows])
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="LR schedule (warm-up, linear decay)")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def plot_finetuning(runs: DemoRuns, target: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    panels = [
        (runs.sentiment, runs.sentiment_scratch, "eval_accuracy", "validation accuracy", "Review sentiment"),
        (runs.ner, runs.ner_scratch, "eval_f1", "validation entity F1", "People's Daily NER"),
    ]
    for ax, (pretrained, scratch, key, ylabel, title) in zip(axes, panels, strict=True):
        for run, label in ((pretrained, "pretrained"), (scratch, "random init")):
            curve = eval_curve(run, key)
            if curve:
                ax.plot(*zip(*curve, strict=True), "o-", label=label)
        ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def confusion(run: Path) -> tuple[list[str], list[list[int]]]:
    rows = [json.loads(line) for line in (run / "test_predictions.jsonl").read_text().splitlines()]
    labels = sorted({r["reference"] for r in rows} | {r["label"] for r in rows})
    index = {name: i for i, name in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for row in rows:
        matrix[index[row["reference"]]][index[row["label"]]] += 1
    return labels, matrix


def plot_confusion(run: Path, target: Path) -> None:
    plt = _plt()
    labels, matrix = confusion(run)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title="Sentiment, test set")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


AGGREGATION_NAMES = {
    "mean": "mean of logits",
    "max": "max of logits",
    "prob_mean": "mean of probabilities",
    "confidence": "confidence-weighted probabilities",
    "margin": "most decided window",
    "attention": "attention pooling",
    "hierarchical": "hierarchical transformer",
}


def long_text_rows(run: Path) -> list[tuple[str, float | None]]:
    """(method, accuracy on the test reviews longer than one window): windows by each aggregation evaluated (the
    exported one marked), truncation, the yardstick."""
    found = results(run)
    test = found.get("test", {})
    chosen = test.get("aggregation")
    rows = [
        (f"windows, {name}" + (" (exported)" if how == chosen else ""), test[f"long_accuracy_{how}"])
        for how, name in AGGREGATION_NAMES.items()
        if f"long_accuracy_{how}" in test
    ]
    rows += [(f"truncation: {k}", v.get("long_accuracy")) for k, v in found.get("test_truncated", {}).items()]
    yardstick = found.get("yardstick", {}).get("test", {})
    rows.append(("TF-IDF + logistic regression", yardstick.get("long_accuracy")))
    return rows


def plot_long_texts(run: Path, target: Path) -> None:
    plt = _plt()
    rows = [(name, value) for name, value in long_text_rows(run) if value is not None]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.32 * len(rows)))
    ax.barh([name for name, _ in rows][::-1], [value for _, value in rows][::-1], color="tab:blue")
    for i, (_, value) in enumerate(rows[::-1]):
        ax.text(value, i, f" {100 * value:.1f}%", va="center")
    ax.set(xlim=(0, 1.1), xlabel="accuracy on test reviews longer than one window", title="Long reviews")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


PLACES = ("alone", "start", "middle", "end")
# eval_results.json keys of the two robustness evaluations (berth.finetune.robustness), and what each hides among
EVALUATIONS = (("robustness", "news"), ("robustness_in_domain", "in-domain neutral sentences"))
HIDDEN_FILLERS = {
    "unrelated": "paragraphs of People's Daily's train share",
    "in_domain": "neutral sentences of the training reviews",
    "both": "People's Daily paragraphs (half of them) and neutral sentences of the training reviews (the other half)",
}


def robustness_rows(run: Path, key: str = "robustness") -> list[tuple[str, list[float | None]]]:
    """(aggregation, accuracy of the test reviews alone and hidden at the start, middle, end of the evaluation's
    surrounding text); empty when the run has no such evaluation."""
    found = results(run).get(key, {})
    if not found:
        return []
    table = {"alone": found["alone"], **found["accuracy"]}
    return [(how, [table[place].get(how) for place in PLACES]) for how in found["alone"]]


def own_windows_at_end(run: Path, key: str = "robustness") -> dict[str, float]:
    """Accuracy at the end with only the windows that hold the review, by aggregation."""
    return results(run).get(key, {}).get("text_windows_only", {}).get("end", {})


def plot_robustness(run: Path, target: Path) -> None:
    """One panel per robustness evaluation the run has, the same axes."""
    plt = _plt()
    panels = [(name, rows) for key, name in EVALUATIONS if (rows := robustness_rows(run, key))]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels, strict=True):
        for how, values in rows:
            ax.plot(range(len(PLACES)), values, marker="o", label=AGGREGATION_NAMES.get(how, how))
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)  # chance for two balanced classes
        ax.set_xticks(range(len(PLACES)), ["review alone", "at the start", "in the middle", "at the end"])
        ax.set(ylim=(0, 1.05), ylabel="accuracy", title=f"A review hidden in 3-8 windows of {name}")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def robustness_section(run: Path) -> str:
    by_key = {key: dict(rows) for key, _ in EVALUATIONS if (rows := robustness_rows(run, key))}
    present = [(key, name) for key, name in EVALUATIONS if key in by_key]
    if not present:
        return ""
    found = results(run)
    own = {key: own_windows_at_end(run, key) for key, _ in present}
    first = found[present[0][0]]
    chosen = found.get("test", {}).get("aggregation", "")
    header = "| aggregation | alone | " + " | ".join(
        f"{name}: start | middle | end | end, own windows" for _, name in present
    )
    cells = []
    for how, values in by_key[present[0][0]].items():
        marked = AGGREGATION_NAMES.get(how, how) + (" (exported)" if how == chosen else "")
        cells.append(
            f"| {marked} | {_pct(values[0])} | "
            + " | ".join(" | ".join(_pct(v) for v in [*by_key[key][how][1:], own[key].get(how)]) for key, _ in present)
            + " |"
        )
    windows = first["windows"]
    share, weight = first.get("hidden_training", 0), first.get("hidden_weight", 1.0)
    filler = HIDDEN_FILLERS[first.get("hidden_filler", "unrelated")]
    weighed = f" and `data.hidden_weight={weight}`" if weight != 1.0 else ""
    trained = (
        f"The model was trained with `data.hidden_training={share}`{weighed}: {share} x the training reviews also "
        f"hidden among {filler} (docs/finetuning.md, hidden-text training)."
        if share
        else "The model was trained on the reviews alone."
    )
    return f"""### Long documents whose verdict comes late

{first["texts"]} test reviews, each hidden at the start, in the middle and at the end of other text
({windows["min"]}-{windows["max"]} windows, {windows["mean"]} on average), beside the same reviews alone; the same
fine-tuned model, each way of combining its windows. Two kinds of surrounding text: **news** (People's Daily
paragraphs from its test share) and **in-domain** (sentences of the validation reviews that a TF-IDF model trained
on the training reviews leaves undecided: the description a reviewer writes around a verdict, docs/finetuning.md).
{trained} The "own windows" columns score the reviews at the end from only the windows that hold some of the
review: what stays below `alone` there is lost inside those windows, which no way of combining windows can win back.

{header} |
|{"---|" * (2 + 4 * len(present))}
{chr(10).join(cells)}

![robustness](plots/robustness.png)
"""


def plot_pretrained_vs_scratch(runs: DemoRuns, target: Path) -> None:
    plt = _plt()
    pairs = [
        ("sentiment accuracy", runs.sentiment, runs.sentiment_scratch, "accuracy"),
        ("NER entity F1", runs.ner, runs.ner_scratch, "f1"),
    ]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, (_, pretrained, scratch, key) in enumerate(pairs):
        a = results(pretrained).get("test", {}).get(key, 0.0)
        b = results(scratch).get("test", {}).get(key, 0.0)
        ax.bar(i - 0.2, a, 0.4, color="tab:blue", label="pretrained" if i == 0 else None)
        ax.bar(i + 0.2, b, 0.4, color="tab:gray", label="random init" if i == 0 else None)
        ax.text(i - 0.2, a, f"{100 * a:.1f}", ha="center", va="bottom")
        ax.text(i + 0.2, b, f"{100 * b:.1f}", ha="center", va="bottom")
    ax.set_xticks(range(len(pairs)), [p[0] for p in pairs])
    ax.set(ylim=(0, 1.1), title="Test set: pretrained vs random init")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def training_minutes(runs: DemoRuns) -> float:
    """Pretraining and fine-tuning time as the runs logged it (the same whether this demo trained or reused)."""
    pretraining = max((m.get("time", 0.0) for m in read_metrics(runs.pretrain)), default=0.0)
    finetuning = sum(
        results(r).get("train_seconds", 0.0)
        for r in (runs.sentiment, runs.sentiment_scratch, runs.ner, runs.ner_scratch)
    )
    return (pretraining + finetuning) / 60


def summary_table(runs: DemoRuns) -> str:
    pre = eval_curve(runs.pretrain, "eval_mlm_accuracy")
    sentiment, scratch = results(runs.sentiment), results(runs.sentiment_scratch)
    ner, ner_scratch = results(runs.ner), results(runs.ner_scratch)
    yard = sentiment.get("yardstick", {}).get("test", {})
    truncated = sentiment.get("test_truncated", {})

    def test(found: dict, key: str) -> float | None:
        return found.get("test", {}).get(key)

    chosen = str(sentiment.get("test", {}).get("aggregation") or "")
    named = AGGREGATION_NAMES.get(chosen, chosen)

    rows = [
        ("Pretraining: held-out masked-token accuracy", _pct(pre[-1][1] if pre else None)),
        ("Sentiment, test accuracy (pretrained, windows)", _pct(test(sentiment, "accuracy"))),
        ("Sentiment, test accuracy (random init)", _pct(test(scratch, "accuracy"))),
        ("Sentiment, TF-IDF + logistic regression yardstick", _pct(yard.get("accuracy"))),
        (
            f"Long test reviews ({test(sentiment, 'long_count')}): windows, {named}",
            _pct(test(sentiment, "long_accuracy")),
        ),
        ("Long test reviews: head truncation", _pct(truncated.get("head", {}).get("long_accuracy"))),
        ("Long test reviews: TF-IDF yardstick", _pct(yard.get("long_accuracy"))),
    ]
    for key, name in EVALUATIONS:
        hidden = sentiment.get(key, {})
        if chosen not in hidden.get("alone", {}):
            continue
        rows.append(
            (
                f"{hidden['texts']} test reviews at the end of 3-8 windows of {name} ({named}; alone: "
                f"{_pct(hidden['alone'][chosen])})",
                _pct(hidden["accuracy"]["end"][chosen]),
            )
        )
    rows += [
        ("NER, test entity F1 (pretrained)", _pct(test(ner, "f1"))),
        ("NER, test entity F1 (random init)", _pct(test(ner_scratch, "f1"))),
    ]
    lines = ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    return "\n".join(lines)


def reuse_note(reused: list[str]) -> str:
    """What this demo run took from earlier runs with the same config, as the report's opening says it."""
    if not reused:
        return "building every stage"
    return f"reusing {', '.join(reused)} (built earlier with the same config)"


def timing_table(timings: list[tuple[str, float]], reused: list[str]) -> str:
    """Where this demo's minutes went, stage by stage (a reused stage takes seconds)."""
    total = sum(minutes for _, minutes in timings) or 1.0
    rows = [f"| {name} | {minutes:.1f} | {100 * minutes / total:.0f}% |" for name, minutes in timings]
    note = f"\n\nReused: {', '.join(reused)}." if reused else ""
    return "| stage | minutes | share |\n|---|---|---|\n" + "\n".join(rows) + note


def write_report(
    out: Path,
    runs: DemoRuns,
    commands: list[str],
    minutes: float,
    reused: list[str],
    timings: list[tuple[str, float]],
    budget_note: str = "",
) -> Path:
    """Plots into out/plots/ and out/report.md. Returns the report's path."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_pretraining(runs.pretrain, plots / "pretraining.png")
    plot_lr(runs.pretrain, plots / "lr_schedule.png")
    plot_finetuning(runs, plots / "finetuning.png")
    plot_confusion(runs.sentiment, plots / "confusion_matrix.png")
    plot_long_texts(runs.sentiment, plots / "long_reviews.png")
    plot_pretrained_vs_scratch(runs, plots / "pretrained_vs_scratch.png")
    if robustness_rows(runs.sentiment):
        plot_robustness(runs.sentiment, plots / "robustness.png")
    curve = "\n".join(f"| {step} | {_pct(acc)} |" for step, acc in eval_curve(runs.pretrain, "eval_mlm_accuracy"))
    long_rows = "\n".join(f"| {name} | {_pct(value)} |" for name, value in long_text_rows(runs.sentiment))
    ner = results(runs.ner).get("test", {})
    per_type = "\n".join(
        f"| {kind} | {ner.get(f'{kind}_precision', 0):.3f} | {ner.get(f'{kind}_recall', 0):.3f} | "
        f"{ner.get(f'{kind}_f1', 0):.3f} | {ner.get(f'{kind}_number', 0)} |"
        for kind in ("PER", "LOC", "ORG")
        if f"{kind}_f1" in ner
    )
    text = f"""# berth demo report

The whole pipeline on the embedded Chinese data, on this machine: {training_minutes(runs):.1f} minutes of
pretraining and fine-tuning (as the runs logged it); this `berth demo` took {duration(minutes)},
{reuse_note(reused)}. Each stage is a command you can run on its own (and point at your own corpus):

```bash
{chr(10).join(commands)}
```

## Results

{summary_table(runs)}

## Where the time went

{timing_table(timings, reused)}

{budget_note}

![pretrained vs random init](plots/pretrained_vs_scratch.png)

## Pretraining

![pretraining curves](plots/pretraining.png) ![LR schedule](plots/lr_schedule.png)

| step | held-out masked-token accuracy |
|---|---|
{curve}

## Fine-tuning

![fine-tuning curves](plots/finetuning.png)

### Long reviews: windows vs truncation

The same fine-tuned model on the test reviews longer than one window, read in windows (each way of combining
them) or truncated to one window:

| method | accuracy |
|---|---|
{long_rows}

![long reviews](plots/long_reviews.png) ![confusion matrix](plots/confusion_matrix.png)

{robustness_section(runs.sentiment)}
### NER per entity type (test, pretrained)

| type | precision | recall | F1 | entities |
|---|---|---|---|---|
{per_type}
"""
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
