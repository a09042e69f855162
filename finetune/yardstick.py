"""A TF-IDF + logistic-regression yardstick on the same split, so a fine-tuned encoder's figures have a floor to
beat: at laptop scale a small BERT can lose to character n-grams, and a report should say so."""

from __future__ import annotations

from typing import Any


def tfidf_yardstick(
    texts: dict[str, list[str]], labels: dict[str, list[int]], long_docs: dict[str, list[int]], seed: int = 0
) -> dict[str, Any]:
    """Character 1-3-gram TF-IDF + logistic regression, trained on the training texts; accuracy and macro F1 on
    validation and test, overall and on the texts longer than one window (as the encoder's metrics)."""
    # scikit-learn loads only when a yardstick is asked for
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    if len(set(labels["train"])) < 2:
        return {"model": "tfidf_char_1_3_logreg", "skipped": "the training split has a single class"}
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform(texts["train"])
    model = LogisticRegression(C=10.0, max_iter=2000, random_state=seed).fit(features, labels["train"])
    out: dict[str, Any] = {"model": "tfidf_char_1_3_logreg"}
    for split in ("validation", "test"):
        if split not in texts:
            continue
        predicted = model.predict(vectorizer.transform(texts[split]))
        truth, long = labels[split], long_docs[split]
        out[split] = {
            "accuracy": float(accuracy_score(truth, predicted)),
            "macro_f1": float(f1_score(truth, predicted, average="macro")),
            "long_accuracy": float(accuracy_score([truth[d] for d in long], predicted[long])) if long else None,
            "long_count": len(long),
        }
    return out
