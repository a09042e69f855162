"""A TF-IDF + logistic-regression yardstick on the same split, so a fine-tuned encoder's figures have a floor to
beat: at laptop scale a small BERT can lose to character n-grams, and a report should say so."""

from __future__ import annotations

from typing import Any

from finetune.classification import ClassificationTask


def tfidf_yardstick(task: ClassificationTask, texts: dict[str, list[str]], seed: int = 0) -> dict[str, Any]:
    """Character 1-3-gram TF-IDF + logistic regression, trained on the task's training texts; accuracy and macro
    F1 on validation and test, overall and on the texts longer than one window (as the encoder's metrics)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    train = task.splits["train"]
    if len(set(train.doc_labels)) < 2:
        return {"model": "tfidf_char_1_3_logreg", "skipped": "the training split has a single class"}
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform(texts["train"])
    model = LogisticRegression(C=10.0, max_iter=2000, random_state=seed).fit(features, train.doc_labels)
    out: dict[str, Any] = {"model": "tfidf_char_1_3_logreg"}
    for split in ("validation", "test"):
        if split not in task.splits:
            continue
        encoded = task.splits[split]
        predicted = model.predict(vectorizer.transform(texts[split]))
        labels = encoded.doc_labels
        long_docs = task.long_documents(split)
        out[split] = {
            "accuracy": float(accuracy_score(labels, predicted)),
            "macro_f1": float(f1_score(labels, predicted, average="macro")),
            "long_accuracy": float(accuracy_score([labels[d] for d in long_docs], predicted[long_docs]))
            if long_docs
            else None,
            "long_count": len(long_docs),
        }
    return out
