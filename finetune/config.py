from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from berth.core.config import check_rates
from berth.core.hub import HubConfig
from berth.runtime.config import TrainConfig


@dataclass(frozen=True)
class ModelRef:
    # The checkpoint to fine-tune: a directory in Hugging Face format (berth's <pretrain output>/final, or any
    # BERT the user has) or a hub id.
    init: str = "runs/pretrain/mini_zh/final"
    # Same architecture and tokenizer as `init`, but random weights: the baseline that shows what pretraining bought.
    from_scratch: bool = False
    # Dropout of the encoder (hidden and attention) and of the classifier while fine-tuning; null keeps the
    # checkpoint's own (a model pretrained without dropout gets it back here, as BERT fine-tunes with 0.1).
    hidden_dropout: float | None = 0.1
    attention_dropout: float | None = 0.1
    classifier_dropout: float = 0.1

    def __post_init__(self) -> None:
        check_rates(
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            classifier_dropout=self.classifier_dropout,
        )


@dataclass(frozen=True)
class TaskData:
    # An embedded dataset (reviews_sentiment, peoples_daily_ner), hf:OWNER/NAME, or empty to read the files below.
    dataset: str = "reviews_sentiment"
    hub_config: str = ""
    # Local files per split (.jsonl/.json, .csv, .tsv, .parquet); test is optional.
    train_file: str = ""
    validation_file: str = ""
    test_file: str = ""
    # Classification: the text (and optional second text of a pair) and the label columns.
    text_column: str = "text"
    text_pair_column: str = ""
    label_column: str = "label"
    # Token classification: the pre-split tokens (characters for Chinese) and their BIO tags.
    tokens_column: str = "tokens"
    tags_column: str = "ner_tags"
    # Label names in id order; empty: taken from the dataset's ClassLabel feature, else sorted training labels.
    label_names: tuple[str, ...] = ()
    # Class weights for the loss, in label order (e.g. for imbalanced data); empty: unweighted.
    class_weights: tuple[float, ...] = ()
    max_seq_len: int = 128
    # Texts longer than one window: windows (overlapping, every window of a training document carries its
    # label; outputs aggregated per document), or truncation keeping the head, the tail, or both.
    long_text: Literal["windows", "head", "tail", "head_tail"] = "windows"
    # Tokens between the starts of consecutive windows (Google's doc_stride); windows overlap by
    # max_seq_len - 2 - stride tokens. The last window is aligned to the end of the text.
    stride: int = 64
    # How window outputs become a document's: mean of logits, max of logits, mean of probabilities (prob_mean),
    # mean of probabilities weighted by each window's confidence (confidence), the most decided window (margin),
    # attention pooling over the windows' [CLS] vectors (a small learned layer, trained with documents as units),
    # hierarchical (a small transformer over them, with its own [CLS], trained the same way),
    # or auto: whichever of mean, max, prob_mean, confidence and margin scores best on validation.
    # docs/finetuning.md says when each is right.
    aggregation: Literal["auto", "mean", "max", "prob_mean", "confidence", "margin", "attention", "hierarchical"] = (
        "auto"
    )
    # hierarchical: a small transformer encoder over the windows' [CLS] vectors, trained with documents as units;
    # its number of layers.
    pooler_layers: int = 1
    # head_tail: the share of the kept tokens taken from the head (Sun et al. 2019 found about 1/4 best).
    head_fraction: float = 0.25
    # Attention pooling trains on documents; each contributes at most this many windows per step (0: all).
    max_train_windows: int = 8
    # Keep N rows of each split, drawn by a seeded shuffle (0: all): a quick smoke run on a large dataset.
    max_examples: int = 0
    # Keep N rows of the training split only, drawn the same way (0: all): training with fewer labels, evaluated
    # on the whole validation and test splits.
    train_examples: int = 0
    # Long-document robustness, evaluation only (classification with windows): up to this many test texts, each
    # hidden at the start, the middle and the end of unrelated paragraphs 3-8 windows long (0: off). 500 keeps
    # the standard error of a position's accuracy near 2 points; 200 left it near 3.
    robustness_docs: int = 500
    # The unrelated paragraphs: auto (People's Daily, for a tokenizer that covers Chinese), a UTF-8 file with one
    # paragraph a line, or empty (no robustness evaluation).
    distractors: str = "auto"
    # The in-domain robustness evaluation beside it: the same test texts hidden among sentences of the task's own
    # validation texts that a TF-IDF model trained on the training split leaves undecided
    # (berth.finetune.neutral_text): the text a reader of the task's domain writes around a verdict.
    in_domain_robustness: bool = True
    # Outlier exposure: windows of unrelated text trained towards a flat distribution, this many per training
    # window each epoch (0: off), so that text without the task's signal stops voting among the windows.
    outlier_exposure: float = 0.0
    # Hidden-text training (0-1): this many extra training documents per training text, each a training text (shorter
    # than a window) hidden at a drawn position among unrelated paragraphs, 3-8 windows long. Window aggregations
    # train the document's windows one by one, each on what it holds (the text's label, or a flat target when it
    # holds none of the text); attention and hierarchical train the whole document (multiple-instance learning).
    hidden_training: float = 0.0
    # The weight of each hidden-text unit in the loss (0-1], the training texts' being 1: below 1 it trades some
    # accuracy where the verdict comes late for less drift on natural text (docs/finetuning.md).
    hidden_weight: float = 1.0
    # What hidden-text training hides training texts among: unrelated (data.outlier_text), in_domain (sentences of
    # the training texts that a TF-IDF model trained on the other half leaves undecided: berth.finetune.neutral_text)
    # or both (half the documents each).
    hidden_filler: Literal["unrelated", "in_domain", "both"] = "unrelated"
    # Where the unrelated text of both comes from: auto (People's Daily's train share, for a tokenizer that covers
    # Chinese; never the test share the robustness evaluation uses), or a UTF-8 file with one paragraph a line.
    outlier_text: str = "auto"

    def __post_init__(self) -> None:
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be at least 8; got {self.max_seq_len}")
        if self.long_text == "windows" and not 1 <= self.stride <= self.max_seq_len - 2:  # truncation reads none
            raise ValueError(
                f"stride must be between 1 and max_seq_len - 2 ({self.max_seq_len - 2}); got {self.stride}"
            )
        if not 0.0 <= self.head_fraction <= 1.0:
            raise ValueError(f"head_fraction must be in [0, 1]; got {self.head_fraction}")
        if not (math.isfinite(self.outlier_exposure) and 0.0 <= self.outlier_exposure <= 10.0):
            raise ValueError(f"outlier_exposure must be in [0, 10]; got {self.outlier_exposure}")
        if not (math.isfinite(self.hidden_training) and 0.0 <= self.hidden_training <= 1.0):
            # each training text is hidden at most once
            raise ValueError(f"hidden_training must be in [0, 1]; got {self.hidden_training}")
        if not (math.isfinite(self.hidden_weight) and 0.0 < self.hidden_weight <= 1.0):
            raise ValueError(f"hidden_weight must be in (0, 1]; got {self.hidden_weight}")
        if not 1 <= self.pooler_layers <= 4:
            raise ValueError(f"pooler_layers must be between 1 and 4; got {self.pooler_layers}")
        if min(self.max_train_windows, self.max_examples, self.robustness_docs, self.train_examples) < 0:
            raise ValueError("max_train_windows, max_examples, train_examples and robustness_docs must be >= 0")
        if any(not (math.isfinite(w) and w >= 0) for w in self.class_weights) or (
            self.class_weights and not any(self.class_weights)
        ):
            raise ValueError(f"class_weights must be finite, >= 0 and not all 0; got {list(self.class_weights)}")


@dataclass(frozen=True)
class FinetuneTrainConfig(TrainConfig):
    """The shared train section (berth.runtime.config) with fine-tuning's defaults and its own fields."""

    epochs: int = 3
    warmup_ratio: float = 0.1
    eval_batch_size: int = 64
    # The validation metric that picks the best checkpoint and drives early stopping (higher is better,
    # except for names ending in loss). Classification: accuracy, macro_f1, micro_f1; ner: f1, precision, recall.
    metric: str = "accuracy"
    # Stop after this many evaluations without improvement; 0: never stop early.
    early_stopping_patience: int = 2
    # Short texts are batched with short texts (random chunks of 50 batches sorted by length).
    group_by_length: bool = True
    # Classification: also fit a TF-IDF (character 1-3 grams) + logistic-regression yardstick on the same split
    # and report it in eval_results.json beside the model's figures.
    yardstick: bool = False
    # Classification with windows: also evaluate the best model on test with head, tail and head_tail
    # truncation instead of windows (the same weights), reported as test_truncated in eval_results.json.
    compare_truncation: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_batch_size < 1 or self.early_stopping_patience < 0:
            raise ValueError("eval_batch_size must be at least 1 and early_stopping_patience >= 0")


@dataclass(frozen=True)
class FinetuneConfig:
    output_dir: str = "runs/finetune/reviews_sentiment"
    # classification: one label per text or text pair (long texts in windows); ner: BIO tags per token.
    task: Literal["classification", "ner"] = "classification"
    model: ModelRef = field(default_factory=ModelRef)
    data: TaskData = field(default_factory=TaskData)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def __post_init__(self) -> None:
        problem = dead_option(self)
        if problem:
            raise ValueError(problem)


# Keys one task reads and the other does not.
CLASSIFICATION_ONLY = (
    "data.text_column",
    "data.text_pair_column",
    "data.label_column",
    "data.long_text",
    "data.aggregation",
    "data.pooler_layers",
    "data.head_fraction",
    "data.max_train_windows",
    "data.robustness_docs",
    "data.distractors",
    "data.in_domain_robustness",
    "data.outlier_exposure",
    "data.hidden_training",
    "data.hidden_weight",
    "data.hidden_filler",
    "data.outlier_text",
    "train.yardstick",
    "train.compare_truncation",
)
NER_ONLY = ("data.tokens_column", "data.tags_column")
POOLED = ("attention", "hierarchical")


def dead_option(cfg: FinetuneConfig) -> str:
    """One line naming the first option that is set (differs from its default) but does nothing with the rest of
    the config, and the setting that makes it so; "" when there is none. The shipped configs set only live keys."""
    values, defaults = _dotted(cfg.data, cfg.train), _dotted(TaskData(), FinetuneTrainConfig())

    def is_set(key: str) -> bool:
        return values[key] != defaults[key]

    data, train = cfg.data, cfg.train
    other = {"classification": NER_ONLY, "ner": CLASSIFICATION_ONLY}[cfg.task]
    for key in other:
        if is_set(key):
            return f"{key}={values[key]} does nothing with task={cfg.task}"
    if cfg.hub.push_checkpoints:
        return (
            "hub.push_checkpoints=true does nothing in fine-tuning (pretraining pushes checkpoints; this pushes final/)"
        )
    if cfg.task == "ner":
        return ""
    windows = data.long_text == "windows"
    # (key, why it does nothing, or "" when it matters)
    rules = (
        ("data.stride", "" if windows else f"data.long_text={data.long_text} (one truncated window per text)"),
        ("data.aggregation", "" if windows else f"data.long_text={data.long_text} (one window per text)"),
        ("data.pooler_layers", "" if data.aggregation == "hierarchical" else f"data.aggregation={data.aggregation}"),
        ("data.max_train_windows", "" if data.aggregation in POOLED else f"data.aggregation={data.aggregation}"),
        (
            "data.head_fraction",
            ""
            if data.long_text == "head_tail" or (train.compare_truncation and windows and not data.text_pair_column)
            else f"data.long_text={data.long_text} and no train.compare_truncation (which also tries head_tail)",
        ),
        ("data.robustness_docs", _single_windows(data)),
        ("data.distractors", _single_windows(data) or ("" if data.robustness_docs else "data.robustness_docs=0")),
        (
            "data.in_domain_robustness",
            _single_windows(data) or ("" if data.robustness_docs else "data.robustness_docs=0"),
        ),
        ("train.compare_truncation", _single_windows(data)),
        ("data.hidden_weight", "" if data.hidden_training else "data.hidden_training=0"),
        ("data.hidden_filler", "" if data.hidden_training else "data.hidden_training=0"),
        (
            "data.outlier_text",
            ""
            if data.outlier_exposure or (data.hidden_training and data.hidden_filler != "in_domain")
            else "data.outlier_exposure=0 and "
            + ("data.hidden_filler=in_domain" if data.hidden_training else "data.hidden_training=0"),
        ),
    )
    for key, why in rules:
        if why and is_set(key):
            return f"{key}={values[key]} does nothing with {why}"
    for key in ("data.outlier_exposure", "data.hidden_training"):
        why = _single_windows(data)
        if why and is_set(key):
            return (
                f"{key}={values[key]} trains on single texts among unrelated text; it needs data.long_text=windows "
                f"and no data.text_pair_column (not {why})"
            )
    if data.outlier_exposure and data.aggregation in POOLED:
        return (
            f"data.outlier_exposure={data.outlier_exposure} trains single windows towards a flat distribution; it "
            f"needs a window aggregation, not {data.aggregation} (use data.hidden_training for the pooled ones)"
        )
    return ""


def _dotted(data: TaskData, train: FinetuneTrainConfig) -> dict[str, str]:
    """section.key -> the value as written in a config (true, not True)."""
    sections = {"data": asdict(data), "train": asdict(train)}
    return {f"{name}.{key}": _shown(value) for name, fields in sections.items() for key, value in fields.items()}


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _single_windows(data: TaskData) -> str:
    """What stops a setting that needs single texts read in windows; "" when they are."""
    if data.long_text != "windows":
        return f"data.long_text={data.long_text}"
    if data.text_pair_column:
        return f"data.text_pair_column={data.text_pair_column} (text pairs)"
    return ""
