"""Neutral text from the task's own corpus: sentences of its texts that carry no verdict, found without extra labels.

The rule: cut texts into sentences (at 。！？!?；; … and line ends), keep those of MIN_SENTENCE_CHARS or more,
and score each with the TF-IDF yardstick's model (character 1-3-grams, logistic regression) trained on whole
training texts that the sentence does not come from. A sentence is neutral when that model leaves it undecided:
every class probability within UNDECIDED_MARGIN of that class's share of the training texts (two balanced
classes: between 0.45 and 0.55). The shares, not chance, so that a sentence that moves nothing is neutral also
where the classes are unbalanced.

- `evaluation_sentences`: sentences of the validation texts, judged by a model trained on the whole training
  split. The in-domain robustness evaluation (`berth.finetune.robustness`) hides test texts among them.
- `training_sentences`: sentences of the training texts, each judged by a model trained on the other half of the
  split (two seeded folds), so no sentence is judged by a model that read its own text's label. Hidden-text
  training with `data.hidden_filler=in_domain` (`berth.finetune.extra_text`) hides training texts among them.

So training never sees the evaluation's sentences, and neither sees the test texts. The model is weak (it reads
n-grams, not meaning): on the embedded reviews most of the sentences it leaves undecided still lean one way to a
reader; docs/finetuning.md shows 20.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

MIN_SENTENCE_CHARS = 8  # shorter pieces are mostly fragments ("还行。", "一般")
# a margin of 0.1 kept about twice as many of the reviews' sentences, and more of them opinions
UNDECIDED_MARGIN = 0.05
MIN_NEUTRAL_SENTENCES = 50  # fewer, and every document would repeat the same few
SENTENCE_END = re.compile(r"(?<=[。！？!?；;…])|\n")


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` of MIN_SENTENCE_CHARS or more, stripped, each keeping its final punctuation."""
    pieces = (piece.strip() for piece in SENTENCE_END.split(text))
    return [piece for piece in pieces if len(piece) >= MIN_SENTENCE_CHARS]


def undecided(
    train_texts: Sequence[str], train_labels: Sequence[int], sentences: Sequence[str], seed: int
) -> list[bool]:
    """For each sentence, whether a yardstick model trained on the given texts (those with a label) leaves it
    undecided; none is when the texts hold fewer than two classes."""
    # scikit-learn loads only when neutral text is asked for, as for the yardstick
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    labelled = [(text, label) for text, label in zip(train_texts, train_labels, strict=True) if label >= 0]
    if len({label for _, label in labelled}) < 2 or not sentences:  # (-1: a missing label)
        return [False] * len(sentences)
    train_texts, train_labels = [text for text, _ in labelled], [label for _, label in labelled]
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True)
    model = LogisticRegression(C=10.0, max_iter=2000, random_state=seed)
    model.fit(vectorizer.fit_transform(train_texts), train_labels)
    probs = model.predict_proba(vectorizer.transform(sentences))  # [S, C], columns in model.classes_ order
    shares = np.array([np.mean(np.asarray(train_labels) == c) for c in model.classes_])  # [C]
    return (np.abs(probs - shares).max(axis=1) < UNDECIDED_MARGIN).tolist()


def evaluation_sentences(
    train_texts: Sequence[str], train_labels: Sequence[int], validation_texts: Sequence[str], seed: int = 0
) -> list[str]:
    """The validation texts' neutral sentences, in a seeded shuffle (neighbours come from different texts)."""
    sentences = [s for text in validation_texts for s in split_sentences(text)]
    keep = undecided(train_texts, train_labels, sentences, seed)
    neutral = [s for s, k in zip(sentences, keep, strict=True) if k]
    logger.info("in-domain neutral text: %d of %d validation sentences left undecided", len(neutral), len(sentences))
    return shuffled(neutral, seed)


def training_sentences(train_texts: Sequence[str], train_labels: Sequence[int], seed: int) -> list[str]:
    """The training texts' neutral sentences, each judged by a model of the other fold, in a seeded shuffle."""
    fold = np.random.default_rng([seed, 21]).permutation(len(train_texts)) % 2  # [N] 0 or 1
    neutral: list[str] = []
    total = 0
    for held in (0, 1):
        fit = [i for i in range(len(train_texts)) if fold[i] != held]
        judged = [s for i in range(len(train_texts)) if fold[i] == held for s in split_sentences(train_texts[i])]
        keep = undecided([train_texts[i] for i in fit], [train_labels[i] for i in fit], judged, seed)
        neutral += [s for s, k in zip(judged, keep, strict=True) if k]
        total += len(judged)
    logger.info("in-domain neutral text: %d of %d training sentences left undecided", len(neutral), total)
    return shuffled(neutral, seed)


def shuffled(sentences: list[str], seed: int) -> list[str]:
    order = np.random.default_rng([seed, 22]).permutation(len(sentences))
    return [sentences[i] for i in order]
