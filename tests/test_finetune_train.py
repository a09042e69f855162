"""Fine-tuning end to end on tiny models and data: exports, predict equivalence, early stopping, bad input."""

import io
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import launch_two_processes
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertForPreTraining,
    pipeline,
)

from berth.app.cli import main
from berth.core.config import load_config
from berth.core.errors import BerthError
from berth.core.text import has_cjk
from berth.core.vocab import load_tokenizer
from berth.corpora.embedded import peoples_daily_ner, reviews_sentiment
from berth.finetune.config import FinetuneConfig
from berth.finetune.pooling import WINDOW_AGGREGATIONS, HierarchicalPooler
from berth.finetune.predict import predict_file
from berth.finetune.train import FinetuneStage, finetune
from berth.finetune.windows import WindowSettings, encode_texts, pair_cuts
from berth.pretrain.model import padded_vocab_size
from berth.runtime.loop import Loop
from berth.runtime.tracking import read_metrics

SMALL = ["train.epochs=2", "train.batch_size=8", "train.precision=fp32", "train.progress_bar=false"]


@pytest.fixture(scope="module")
def tiny(zh_tokenizer_dir, tmp_path_factory):
    """A tiny random BERT with berth's Chinese tokenizer, and small review and NER files."""
    _, _, tokenizer_dir = zh_tokenizer_dir
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = load_tokenizer(tokenizer_dir)
    config = BertConfig(
        vocab_size=padded_vocab_size(len(tokenizer), 64),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForPreTraining(config).save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(root / "ckpt")

    reviews = reviews_sentiment()
    names = {0: "neg", 1: "pos"}
    for split, count in (("train", 64), ("validation", 24), ("test", 24)):
        rows = reviews[split]
        picked = [i for i in range(len(rows)) if rows[i]["label"] == 0][: count // 2]
        picked += [i for i in range(len(rows)) if rows[i]["label"] == 1][: count // 2]
        with (root / f"reviews_{split}.jsonl").open("w") as handle:
            for i in picked:
                handle.write(json.dumps({"review": rows[i]["text"], "sentiment": names[rows[i]["label"]]}) + "\n")

    ner = peoples_daily_ner()
    labels = ner["train"].features["ner_tags"].feature.names
    for split, count in (("train", 48), ("validation", 16), ("test", 16)):
        with (root / f"ner_{split}.jsonl").open("w") as handle:
            kept = 0
            for row in ner[split]:
                # all-CJK paragraphs: one word per character both as tokens and as raw text for predict
                if kept < count and all(has_cjk(c) for c in row["tokens"]) and any(row["ner_tags"]):
                    tags = [labels[t] for t in row["ner_tags"]]
                    handle.write(json.dumps({"tokens": row["tokens"], "ner_tags": tags}, ensure_ascii=False) + "\n")
                    kept += 1
    return root


def review_config(tiny, out, *overrides):
    return load_config(
        FinetuneConfig,
        "configs/finetune/reviews_sentiment.yaml",
        [
            f"output_dir={out}",
            f"model.init={tiny / 'ckpt'}",
            "data.dataset=",
            f"data.train_file={tiny / 'reviews_train.jsonl'}",
            f"data.validation_file={tiny / 'reviews_validation.jsonl'}",
            f"data.test_file={tiny / 'reviews_test.jsonl'}",
            "data.text_column=review",
            "data.label_column=sentiment",
            "data.max_seq_len=32",
            "data.stride=16",
            # the plain path (auto: the best window aggregation); shipped hidden-text training and margin: own tests
            "data.aggregation=auto",
            "data.hidden_training=0",
            "data.hidden_weight=1",
            *SMALL,
            *overrides,
        ],
    )


def ner_config(tiny, out, *overrides):
    return load_config(
        FinetuneConfig,
        "configs/finetune/peoples_daily_ner.yaml",
        [
            f"output_dir={out}",
            f"model.init={tiny / 'ckpt'}",
            "data.dataset=",
            f"data.train_file={tiny / 'ner_train.jsonl'}",
            f"data.validation_file={tiny / 'ner_validation.jsonl'}",
            f"data.test_file={tiny / 'ner_test.jsonl'}",
            "data.max_seq_len=24",
            "data.stride=8",
            "train.lr=1e-3",
            *SMALL,
            *overrides,
        ],
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tfidf_reference(tiny: Path) -> float:
    """Test accuracy of character 1-3-gram TF-IDF + logistic regression, fitted here with scikit-learn directly."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train, test = (read_jsonl(tiny / f"reviews_{split}.jsonl") for split in ("train", "test"))
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform([r["review"] for r in train])
    model = LogisticRegression(C=10.0, max_iter=2000, random_state=0).fit(features, [r["sentiment"] for r in train])
    predicted = model.predict(vectorizer.transform([r["review"] for r in test]))
    return sum(p == r["sentiment"] for p, r in zip(predicted, test, strict=True)) / len(test)


def entity_f1_reference(rows: list[dict]) -> float:
    """Micro entity F1 (type and exact extent), counted here from the prediction rows."""
    spans = [{(s["type"], s["start"], s["end"]) for s in row[key]} for row in rows for key in ("entities", "reference")]
    predicted, gold = spans[0::2], spans[1::2]
    hits = sum(len(p & g) for p, g in zip(predicted, gold, strict=True))
    n_pred, n_gold = sum(map(len, predicted)), sum(map(len, gold))
    precision, recall = hits / max(n_pred, 1), hits / max(n_gold, 1)
    return 2 * precision * recall / (precision + recall) if hits else 0.0


def gold_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """BIO tags -> (type, start, end) spans, written out here independently of berth.finetune.bio."""
    spans, start, kind = [], None, None
    for i, tag in enumerate([*tags, "O"]):
        if kind is not None and not (tag.startswith("I-") and tag[2:] == kind):
            spans.append((kind, start, i))
            kind = None
        if tag.startswith("B-") or (tag.startswith("I-") and kind is None):
            start, kind = i, tag[2:]
    return spans


def texts_of(path: Path, field: str) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return ["".join(r[field]) if isinstance(r[field], list) else r[field] for r in rows]


def run_predict(model_dir: Path, texts: list[str], tmp_path: Path) -> list[dict]:
    source = tmp_path / "input.txt"
    source.write_text("".join(f"{t}\n" for t in texts), encoding="utf-8")
    out = io.StringIO()
    predict_file(str(model_dir), str(source), out, batch_size=7, progress=False)
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def review_run(tiny):
    final = finetune(review_config(tiny, tiny / "run-reviews", "train.yardstick=true"))
    return final.parent


def test_classification_run_writes_results_predictions_and_a_loadable_export(review_run, tiny):
    results = json.loads((review_run / "eval_results.json").read_text())
    for split in ("validation", "test"):
        assert results[split]["long_count"] > 0  # texts longer than one 32-token window
        assert results[split]["aggregation"] in ("mean", "max", "prob_mean", "confidence", "margin")
    assert results["test"]["aggregation"] == results["validation"]["aggregation"]  # chosen on validation
    assert set(results["test_truncated"]) == {"head", "tail", "head_tail"}
    yardstick = results["yardstick"]
    assert yardstick["test"]["long_count"] == results["test"]["long_count"]
    rows = [json.loads(line) for line in (review_run / "test_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {r["reference"] for r in rows} == {"neg", "pos"}
    # the reported figures, recomputed from the rows and the files themselves
    assert [r["reference"] for r in rows] == [r["sentiment"] for r in read_jsonl(tiny / "reviews_test.jsonl")]
    assert results["test"]["accuracy"] == sum(r["label"] == r["reference"] for r in rows) / len(rows)
    assert yardstick["test"]["accuracy"] == tfidf_reference(tiny)
    assert (review_run / "config.yaml").is_file()
    metrics = [json.loads(line) for line in (review_run / "metrics.jsonl").read_text().splitlines()]
    # every window is a training unit: an epoch is (windows // batch) steps, evaluated at its end
    settings = WindowSettings(max_seq_len=32, stride=16)
    windows = encode_texts(load_tokenizer(tiny / "ckpt"), texts_of(tiny / "reviews_train.jsonl", "review"), settings)
    per_epoch = -(-len(windows.window_ids) // 8)
    assert per_epoch > 64 // 8  # long reviews gave several windows
    assert [m["step"] for m in metrics if "eval_accuracy" in m] == [per_epoch, 2 * per_epoch]

    final = review_run / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    card = (final / "README.md").read_text()
    assert 'pipeline_tag: "text-classification"' in card and "| test | accuracy |" in card
    assert "/tmp" not in card and str(tiny) not in card  # published cards name no local absolute path
    assert "init: ckpt\n" in card and "train_file: reviews_train.jsonl\n" in card
    classify = pipeline("text-classification", model=str(final))
    assert classify("质量很好")[0]["label"] in ("neg", "pos")


def test_predict_reproduces_the_runs_test_predictions(review_run, tiny, tmp_path):
    """berth predict cuts and aggregates as evaluation did: the same label and score for every test text."""
    texts = texts_of(tiny / "reviews_test.jsonl", "review")
    predicted = run_predict(review_run / "final", texts, tmp_path)
    expected = [json.loads(line) for line in (review_run / "test_predictions.jsonl").read_text().splitlines()]
    assert [p["label"] for p in predicted] == [e["label"] for e in expected]
    assert [p["score"] for p in predicted] == pytest.approx([e["score"] for e in expected], abs=1e-5)


def reference_combine(logits, how):
    """A document's scores [C] from its windows' logits [W, C], written here from the definitions."""
    probs = torch.softmax(logits.double(), -1)
    if how == "mean":
        return logits.mean(0)
    if how == "max":
        return logits.max(0).values
    if how == "prob_mean":
        return probs.mean(0).log()
    if how == "confidence":
        weights = probs.max(-1).values - 1 / logits.shape[-1]
        weights = weights if weights.sum() > 0 else torch.ones_like(weights)
        mixed = (probs * weights[:, None]).sum(0)
        return (mixed / mixed.sum()).log()
    if how == "margin":
        top = probs.log().topk(2, -1).values
        return probs[int((top[:, 0] - top[:, 1]).argmax())].log()
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["mean", "max", "prob_mean", "confidence", "margin"])
def test_the_reference_combination_is_berths_aggregation(how):
    from berth.finetune.pooling import aggregate

    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)) * 3  # [W, C], one document
    ours = aggregate(logits, torch.zeros(5, dtype=torch.long), 1, how)[0]
    assert torch.allclose(torch.softmax(ours.double(), -1), torch.softmax(reference_combine(logits, how), -1).double())


def test_predict_on_long_texts_agrees_with_windows_computed_here(review_run, tiny, tmp_path):
    """An independent reference for texts longer than one window: the windows cut here by hand, run through
    AutoModelForSequenceClassification, and their logits combined by the aggregation the export names."""
    from transformers import AutoTokenizer

    final = review_run / "final"
    settings = json.loads((final / "config.json").read_text())["berth"]
    tokenizer, model = AutoTokenizer.from_pretrained(final), AutoModelForSequenceClassification.from_pretrained(final)
    room, stride = settings["max_seq_len"] - 2, settings["stride"]
    texts = [t for t in texts_of(tiny / "reviews_test.jsonl", "review") if len(tokenizer(t)["input_ids"]) > room + 2]
    assert len(texts) >= 3
    expected = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        starts = [*range(0, len(ids) - room, stride), len(ids) - room]
        windows = [[tokenizer.cls_token_id, *ids[a : a + room], tokenizer.sep_token_id] for a in starts]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(windows)).logits  # [W, C]
        score, label = torch.softmax(reference_combine(logits, settings["aggregation"]), -1).max(-1)
        expected.append((model.config.id2label[int(label)], float(score)))
    predicted = run_predict(final, texts, tmp_path)
    assert [p["label"] for p in predicted] == [label for label, _ in expected]
    assert [p["score"] for p in predicted] == pytest.approx([score for _, score in expected], abs=1e-5)


def test_predict_agrees_with_the_transformers_pipeline_on_short_texts(review_run, tmp_path):
    texts = ["质量很好", "太差了，不会再买"]
    classify = pipeline("text-classification", model=str(review_run / "final"))
    ours = run_predict(review_run / "final", texts, tmp_path)
    theirs = classify(texts)
    assert [o["label"] for o in ours] == [t["label"] for t in theirs]
    assert [o["score"] for o in ours] == pytest.approx([t["score"] for t in theirs], abs=1e-5)


def test_attention_pooling_is_trained_saved_and_used_by_predict(tiny, tmp_path):
    final = finetune(review_config(tiny, tmp_path / "run", "data.aggregation=attention"))
    assert (final / "window_pooler.safetensors").is_file()
    pooler = load_file(str(final / "window_pooler.safetensors"))
    assert pooler["score.weight"].shape == (1, 32)
    results = json.loads((final.parent / "eval_results.json").read_text())
    assert results["test"]["aggregation"] == "attention"
    texts = texts_of(tiny / "reviews_test.jsonl", "review")
    predicted = run_predict(final, texts, tmp_path)
    expected = [json.loads(line) for line in (final.parent / "test_predictions.jsonl").read_text().splitlines()]
    assert [p["score"] for p in predicted] == pytest.approx([e["score"] for e in expected], abs=1e-5)


def test_hierarchical_pooling_is_trained_saved_and_predict_reads_3000_characters_by_every_aggregation(tiny, tmp_path):
    final = finetune(review_config(tiny, tmp_path / "run", "data.aggregation=hierarchical", "data.pooler_layers=2"))
    pooler = load_file(str(final / "window_pooler.safetensors"))
    assert pooler["cls"].shape == (32,) and HierarchicalPooler.layers_in(pooler) == 2
    results = json.loads((final.parent / "eval_results.json").read_text())
    assert results["test"]["aggregation"] == "hierarchical"
    assert set(results["robustness"]["alone"]) == {*WINDOW_AGGREGATIONS, "hierarchical"}
    texts = texts_of(tiny / "reviews_test.jsonl", "review")
    predicted = run_predict(final, texts, tmp_path)
    expected = [json.loads(line) for line in (final.parent / "test_predictions.jsonl").read_text().splitlines()]
    assert [p["score"] for p in predicted] == pytest.approx([e["score"] for e in expected], abs=1e-5)

    long_text = "".join(texts)[:3000]
    assert len(long_text) == 3000
    for how in (*WINDOW_AGGREGATIONS, "hierarchical"):  # the window aggregations need no weights of their own
        export = tmp_path / f"export-{how}"
        shutil.copytree(final, export)
        config = json.loads((export / "config.json").read_text())
        config["berth"]["aggregation"] = how
        (export / "config.json").write_text(json.dumps(config))
        [row] = run_predict(export, [long_text], tmp_path)
        assert row["label"] in ("neg", "pos") and 0.5 <= row["score"] <= 1.0, how


def test_pair_cuts_slide_over_the_longer_text_with_the_shorter_in_every_window():
    settings = WindowSettings(max_seq_len=16, stride=4)  # 13 tokens of room beside [CLS] [SEP] [SEP]
    short, passage = [1, 2, 3], list(range(100, 120))
    assert pair_cuts([1, 2], [3, 4, 5], settings) == [([1, 2], [3, 4, 5])]
    # the passage second (question, passage): windows of 10, starts 4 apart, the last aligned to the end
    spans = [(0, 10), (4, 14), (8, 18), (10, 20)]
    assert pair_cuts(short, passage, settings) == [(short, passage[a:b]) for a, b in spans]
    # the long text first (premise, hypothesis): the windows slide over the first text instead
    spans = [(0, 11), (4, 15), (8, 19), (9, 20)]
    assert pair_cuts(passage, [1, 2], settings) == [(passage[a:b], [1, 2]) for a, b in spans]
    # both long: the shorter is cut to half the room (6) and the other slides through 7 at a time
    first, second = list(range(50, 70)), list(range(100, 130))
    spans = [(0, 7), (4, 11), (8, 15), (12, 19), (16, 23), (20, 27), (23, 30)]
    assert pair_cuts(first, second, settings) == [(first[:6], second[a:b]) for a, b in spans]
    # a truncation strategy: one window, truncated longest-first
    head = replace(settings, long_text="head")
    assert pair_cuts(list(range(1, 11)), list(range(11, 21)), head) == [(list(range(1, 7)), list(range(11, 18)))]


def test_encoded_pair_windows_carry_both_segments(tiny):
    tokenizer = load_tokenizer(tiny / "ckpt")
    good, bad = tokenizer.convert_tokens_to_ids(["好", "差"])
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    encoded = encode_texts(tokenizer, ["好好好"], WindowSettings(max_seq_len=16, stride=4), ["差" * 20], [1])
    assert encoded.doc_windows == [[0, 1, 2, 3]] and encoded.doc_tokens == [23]
    assert encoded.window_ids[0] == [cls, good, good, good, sep, *[bad] * 10, sep]
    assert encoded.window_types[0] == [0] * 5 + [1] * 11
    assert all(len(ids) == 16 for ids in encoded.window_ids)


def test_a_pair_model_fine_tunes_and_predicts_pairs(tiny, tmp_path, review_run):
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (tiny / f"reviews_{split}.jsonl").read_text().splitlines()]
        with (tmp_path / f"{split}.jsonl").open("w") as handle:
            for row in rows:  # the review's first 6 characters and the rest, as a pair
                pair = {"first": row["review"][:6], "rest": row["review"][6:] or "。", "sentiment": row["sentiment"]}
                handle.write(json.dumps(pair, ensure_ascii=False) + "\n")
    files = [f"data.{split}_file={tmp_path / f'{split}.jsonl'}" for split in ("train", "validation", "test")]
    pair_columns = ("data.text_column=first", "data.text_pair_column=rest", "train.max_steps=4")
    pair_columns += ("train.compare_truncation=false",)  # windows against truncation: single texts only
    final = finetune(review_config(tiny, tmp_path / "run", *files, *pair_columns))
    assert json.loads((final / "config.json").read_text())["berth"]["text_pair"] is True
    results = json.loads((final.parent / "eval_results.json").read_text())
    assert results["test"]["long_count"] > 0  # pairs longer than one 32-token window

    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"text": r["first"], "text_pair": r["rest"]}) + "\n" for r in rows))
    out = io.StringIO()
    predict_file(str(final), str(source), out, batch_size=7, progress=False)
    predicted = [json.loads(line) for line in out.getvalue().splitlines()]
    expected = [json.loads(line) for line in (final.parent / "test_predictions.jsonl").read_text().splitlines()]
    assert [p["label"] for p in predicted] == [e["label"] for e in expected]
    assert [p["score"] for p in predicted] == pytest.approx([e["score"] for e in expected], abs=1e-5)

    (tmp_path / "plain.txt").write_text("质量很好\n")
    with pytest.raises(BerthError, match=r"plain\.txt: this model classifies text pairs; give JSON lines with"):
        predict_file(str(final), str(tmp_path / "plain.txt"), io.StringIO(), progress=False)
    (tmp_path / "half.jsonl").write_text('{"text": "质量很好", "text_pair": "不错"}\n{"text": "质量很好"}\n')
    with pytest.raises(BerthError, match=r"half\.jsonl line 2: this model classifies text pairs; 'text_pair' must"):
        predict_file(str(final), str(tmp_path / "half.jsonl"), io.StringIO(), progress=False)
    with pytest.raises(BerthError, match=r"half\.jsonl line 1: 'text_pair' given, but this model classifies single"):
        predict_file(str(review_run / "final"), str(tmp_path / "half.jsonl"), io.StringIO(), progress=False)


def test_truncation_gives_one_window_per_text(tiny, tmp_path):
    # the stride and the windows-against-truncation comparison do nothing under truncation: back to their defaults
    untouched = ("data.stride=64", "train.compare_truncation=false")
    final = finetune(review_config(tiny, tmp_path / "run", "data.long_text=head_tail", "train.epochs=1", *untouched))
    rows = [json.loads(line) for line in (final.parent / "test_predictions.jsonl").read_text().splitlines()]
    assert {r["windows"] for r in rows} == {1}
    assert json.loads((final / "config.json").read_text())["berth"]["long_text"] == "head_tail"


def step_figures(run_dir):
    """(loss, gradient norm before clipping) of every step: a constant scale error in the loss or the gradient
    shows here, where AdamW's normalised, clipped update would hide it in the weights."""
    return [f for m in read_metrics(run_dir) if "loss" in m for f in (m["loss"], m["grad_norm"])]


def test_gradient_accumulation_gives_the_same_weights(tiny, tmp_path):
    common = ["train.max_steps=3", "train.log_every=1", "model.hidden_dropout=0", "model.attention_dropout=0"]
    common.append("model.classifier_dropout=0")
    one = finetune(review_config(tiny, tmp_path / "one", *common))
    two = finetune(review_config(tiny, tmp_path / "two", *common, "train.batch_size=4", "train.grad_accum=2"))
    assert len(step_figures(one.parent)) == 6
    assert step_figures(two.parent) == pytest.approx(step_figures(one.parent), rel=1e-5)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("aggregation", [pytest.param("auto", marks=pytest.mark.slow), "attention"])
def test_two_processes_reach_the_weights_and_metrics_of_one(tiny, tmp_path, aggregation):
    """DDP through the shipped CPU config: same weights, same validation figures (evaluation is sharded and
    gathered back in order), the same test predictions; with attention pooling, its layer too. Both with
    hidden-text training (windows trained flat among them) at a weight below the training texts'."""
    common = [
        f"data.aggregation={aggregation}",
        "data.hidden_training=1",
        "data.hidden_weight=0.5",
        "train.max_steps=3",
        "train.eval_every=3",
        "train.log_every=1",
        "model.hidden_dropout=0",
        "model.attention_dropout=0",
        "model.classifier_dropout=0",
    ]
    one = finetune(review_config(tiny, tmp_path / "one", *common))
    cfg = review_config(tiny, tmp_path / "two", *common, "train.batch_size=4")
    overrides = [f"{k}={v}" for k, v in _flat_overrides(cfg)]
    result = launch_two_processes("finetune", ["configs/finetune/reviews_sentiment.yaml", *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 8" in result.stderr
    assert len(step_figures(one.parent)) == 6
    assert step_figures(tmp_path / "two") == pytest.approx(step_figures(one.parent), rel=1e-4)
    for weights in ("model.safetensors", "window_pooler.safetensors")[: 1 + (aggregation == "attention")]:
        a, b = load_file(str(one / weights)), load_file(str(tmp_path / "two" / "final" / weights))
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    results = [json.loads((d / "eval_results.json").read_text()) for d in (one.parent, tmp_path / "two")]
    assert results[0]["validation"]["loss"] == pytest.approx(results[1]["validation"]["loss"], rel=1e-4)
    assert results[0]["test"]["accuracy"] == results[1]["test"]["accuracy"]


def _flat_overrides(cfg):
    """The resolved config as section.key=value pairs, so a subprocess runs exactly this config."""
    from berth.core.config import to_dict

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            elif isinstance(value, list):
                yield f"{prefix}{key}", "[" + ",".join(map(str, value)) + "]"
            else:
                yield f"{prefix}{key}", "" if value is None else value

    return list(walk(to_dict(cfg)))


def test_early_stopping_keeps_the_best_evaluation(tiny, tmp_path):
    scripted = iter([0.50, 0.70, 0.60, 0.65, 0.99, 0.99])

    class Scripted(FinetuneStage):
        def build(self, acc, engine):
            model = super().build(acc, engine)
            real = self.task.evaluate

            def evaluate(model, split, acc, batch_size, aggregation=None):
                metrics, rows = real(model, split, acc, batch_size, aggregation)
                return {**metrics, "accuracy": next(scripted)}, rows

            self.task.evaluate = evaluate
            return model

    cfg = review_config(tiny, tmp_path / "run", "train.eval_every=2", "train.early_stopping_patience=2")
    Loop(cfg, Scripted(cfg)).run()
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["best_step"] == 4 and results["steps"] == 8  # 0.70 at step 4; 0.60, 0.65 then stop
    assert results["validation"]["accuracy"] == 0.70


# Where step 10 falls: windows are the units of mean/max (more than 10 steps an epoch); attention pooling
# trains on the 64 documents, 8 steps an epoch, so step 10 is the second step of epoch 1.
@pytest.mark.parametrize(("aggregation", "position"), [("auto", (0, 10)), ("attention", (1, 2))])
def test_resumed_finetuning_ends_with_the_weights_of_an_uninterrupted_run(tiny, tmp_path, aggregation, position):
    """Killed right after a mid-epoch checkpoint and resumed: the same weights (dropout on, so the RNG states
    must come back too), the same test figures and one metrics log."""
    common = [f"data.aggregation={aggregation}", "train.eval_every=5", "train.keep_checkpoints=100"]
    whole = finetune(review_config(tiny, tmp_path / "whole", *common)).parent
    checkpoints = sorted(p.name for p in (whole / "checkpoints").glob("step-*"))
    results = json.loads((whole / "eval_results.json").read_text())
    assert len(checkpoints) == -(-results["steps"] // 5)  # one after each evaluation, the last one included
    state = json.loads((whole / "checkpoints" / "step-00000010" / "state.json").read_text())
    assert (state["epoch"], state["epoch_step"]) == position  # mid-epoch: the resumed run skips epoch_step batches

    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    for later in checkpoints[2:]:
        shutil.rmtree(resumed / "checkpoints" / later)
    for name in ("final", "eval_results.json", "test_predictions.jsonl"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    finetune(review_config(tiny, resumed, *common, "train.resume=auto"))

    # the weights where training ended (the last checkpoint, pooler included) and the exported best ones
    last = f"checkpoints/{checkpoints[-1]}/model.safetensors"
    files = [last, "final/model.safetensors"] + ["final/window_pooler.safetensors"] * (aggregation == "attention")
    for name in files:
        a, b = (load_file(str(d / name)) for d in (whole, resumed))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    again = json.loads((resumed / "eval_results.json").read_text())
    assert again["test"] == results["test"] and again["validation"] == results["validation"]
    assert (again["best_step"], again["steps"]) == (results["best_step"], results["steps"])
    steps = [[(m["step"], m.get("loss"), m.get("eval_loss")) for m in read_metrics(d)] for d in (whole, resumed)]
    assert steps[0] == steps[1]


def test_resume_refuses_a_changed_model_or_data_config(tiny, tmp_path):
    finetune(review_config(tiny, tmp_path / "run", "train.max_steps=2", "train.eval_every=2"))
    with pytest.raises(BerthError, match=r"refusing to resume .*: the config changed: data.max_seq_len: 32 -> 48$"):
        finetune(review_config(tiny, tmp_path / "run", "train.max_steps=2", "train.resume=auto", "data.max_seq_len=48"))
    with pytest.raises(BerthError, match=r"train.resume=.*nowhere: not a checkpoint directory \(no state.json\)"):
        finetune(review_config(tiny, tmp_path / "run", f"train.resume={tmp_path / 'nowhere'}"))
    # a fresh start there would overwrite and prune the earlier run's checkpoints
    with pytest.raises(BerthError, match=r"holds the checkpoints of an earlier run \(newest step-00000002\)"):
        finetune(review_config(tiny, tmp_path / "run", "train.max_steps=2"))
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "state.json").is_file()


def test_resume_refuses_training_data_changed_under_the_same_file_name(tiny, tmp_path):
    for split in ("train", "validation", "test"):
        shutil.copy(tiny / f"reviews_{split}.jsonl", tmp_path / f"{split}.jsonl")
    files = [f"data.{split}_file={tmp_path / f'{split}.jsonl'}" for split in ("train", "validation", "test")]
    finetune(review_config(tiny, tmp_path / "run", *files, "train.max_steps=2", "train.eval_every=2"))
    rows = (tmp_path / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # the same rows, another order
    with pytest.raises(BerthError, match=r"refusing to resume .*: the data under the same config changed \(data: "):
        finetune(review_config(tiny, tmp_path / "run", *files, "train.max_steps=4", "train.resume=auto"))


def test_keep_checkpoints_zero_writes_none(tiny, tmp_path):
    final = finetune(review_config(tiny, tmp_path / "run", "train.max_steps=2", "train.keep_checkpoints=0"))
    assert not (final.parent / "checkpoints").exists()


def test_ner_run_and_predict_give_the_same_entities(tiny, tmp_path):
    # tags other than O weigh 20 times more, so that the tiny model does tag entities and the comparison below is
    # of real spans
    final = finetune(ner_config(tiny, tmp_path / "run", "data.class_weights=[0.05,1,1,1,1,1,1]"))
    results = json.loads((final.parent / "eval_results.json").read_text())
    assert {"f1", "precision", "recall", "PER_f1"} <= set(results["test"])
    assert results["test"]["long_count"] > 0  # paragraphs longer than one 24-token window
    model = AutoModelForTokenClassification.from_pretrained(final)
    assert model.config.id2label[0] == "O"
    texts = texts_of(tiny / "ner_test.jsonl", "tokens")
    predicted = run_predict(final, texts, tmp_path)
    expected = [json.loads(line) for line in (final.parent / "test_predictions.jsonl").read_text().splitlines()]
    assert [[(e["type"], e["start"], e["end"]) for e in p["entities"]] for p in predicted] == [
        [(e["type"], e["start"], e["end"]) for e in row["entities"]] for row in expected
    ]
    for p, text in zip(predicted, texts, strict=True):
        assert all(e["text"] == text[e["start"] : e["end"]] for e in p["entities"])
    assert sum(len(p["entities"]) for p in predicted) > 0  # the comparison above is not [] against []
    tags = [row["ner_tags"] for row in read_jsonl(tiny / "ner_test.jsonl")]
    assert [[(e["type"], e["start"], e["end"]) for e in row["reference"]] for row in expected] == [
        gold_spans(t) for t in tags
    ]
    assert results["test"]["f1"] == pytest.approx(entity_f1_reference(expected), abs=1e-9)


# -- bad input: one line naming what is wrong, and nothing already written is touched -----------------------


def cli(args, capsys):
    """The exit code and the error lines (progress bars of datasets may precede them on standard error)."""
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if "error" in line]


def test_bad_input_gets_one_clear_line_and_leaves_the_run_intact(review_run, tiny, tmp_path, capsys):
    # A finished run without its checkpoints (with them, a fresh start is refused first: the last case).
    run = tmp_path / "run"
    shutil.copytree(review_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    before = {p: p.read_bytes() for d in (run, review_run) for p in d.rglob("*") if p.is_file()}
    base = [
        "finetune",
        "configs/finetune/reviews_sentiment.yaml",
        f"output_dir={run}",
        f"model.init={tiny / 'ckpt'}",
        "data.dataset=",
        f"data.train_file={tiny / 'reviews_train.jsonl'}",
        "data.text_column=review",
        "data.label_column=sentiment",
    ]
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text('{"review": "还行", "sentiment": "pos"}\n{"review": "一般", "sentiment": "meh"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"review": "好", "sentiment": "pos"}\n{"review": "  ", "sentiment": "neg"}\n')
    cases = [
        ([f"data.validation_file={unseen}"], f"{unseen} row 1: label 'meh' never seen in training (labels: neg, pos)"),
        ([f"data.validation_file={empty}"], f"{empty} row 1: empty text in column 'review'"),
        (
            [f"data.validation_file={unseen}", "data.label_column=stars"],
            "no column 'stars' (columns: review, sentiment)",
        ),
        ([f"data.validation_file={unseen}", f"model.init={tmp_path}"], "not a model directory (no config.json)"),
        ([f"data.validation_file={unseen}", "train.metric=f1"], "train.metric=f1: not a classification metric"),
        (
            [f"data.validation_file={unseen}", "model.init=nobody/no-model"],
            "model.init=nobody/no-model: no such directory, and the hub (where OWNER/NAME ids are found) is "
            "unreachable or offline mode is set",
        ),
    ]
    for extra, message in cases:
        code, err = cli([*base, *extra], capsys)
        assert code == 2 and len(err) == 1, err
        assert message in err[0]
    code, err = cli([*base, f"output_dir={review_run}", f"data.validation_file={unseen}"], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"{review_run / 'checkpoints'} holds the checkpoints of an earlier run" in err[0]
    after = {p: p.read_bytes() for d in (run, review_run) for p in d.rglob("*") if p.is_file()}
    assert after == before


def test_a_checkpoint_whose_vocabulary_does_not_match_its_tokenizer_is_refused(tiny, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny / "ckpt", broken)
    config = json.loads((broken / "config.json").read_text())
    config["vocab_size"] = 100
    (broken / "config.json").write_text(json.dumps(config))
    code, err = cli(["finetune", "configs/finetune/reviews_sentiment.yaml", f"model.init={broken}"], capsys)
    assert code == 2 and len(err) == 1
    assert "the model's vocabulary holds 100; this checkpoint and tokenizer do not belong together" in err[0]


def test_predict_rejects_bad_input_before_writing_anything(review_run, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "好"}\n{"text": ""}\n')
    code, err = cli(["predict", str(review_run / "final"), "--input", str(source)], capsys)
    assert code == 2 and err == [f"berth: error: {source} line 2: empty text"]
    assert capsys.readouterr().out == ""
    code, err = cli(["predict", str(tmp_path), "--input", str(source)], capsys)
    assert code == 2 and "not a model directory" in err[-1]


def test_predict_says_which_byte_of_standard_input_is_not_utf8(review_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("好\n".encode() + b"\xff\n"), encoding="utf-8"))
    code, err = cli(["predict", str(review_run / "final")], capsys)
    assert code == 2 and err == ["berth: error: <stdin>: not UTF-8 text (byte 4)"]
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_wandb_writes_into_the_run_directory(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    final = finetune(review_config(tiny, tmp_path / "run", "train.max_steps=2", "train.trackers=[wandb]"))
    assert list((final.parent / "wandb").glob("offline-run-*"))
    assert not (tmp_path / "wandb").exists()


def test_hub_push_in_the_config_uploads_the_export(tiny, tmp_path, fake_hub, monkeypatch):
    from conftest import HUB_TOKEN

    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    final = finetune(
        review_config(tiny, tmp_path / "run", "train.max_steps=2", "hub.push=true", "hub.repo_id=bob/reviews")
    )
    (commit,) = fake_hub.commits
    assert commit["repo"] == "bob/reviews" and commit["revision"] == "main"
    assert commit["files"]["model.safetensors"] == (final / "model.safetensors").read_bytes()
    card = commit["files"]["README.md"].decode()
    assert card.startswith("---\n") and 'pipeline_tag: "text-classification"' in card


def test_hub_push_without_a_token_stops_before_training(tiny, tmp_path, fake_hub):
    from berth.core.errors import BerthError

    with pytest.raises(BerthError, match="needs a Hugging Face token"):
        finetune(review_config(tiny, tmp_path / "run", "hub.push=true", "hub.repo_id=bob/reviews"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("aggregation", ["auto", "attention"])
def test_a_modernbert_checkpoint_fine_tunes_and_predicts(tiny, tmp_path, aggregation):
    """Encoders without token types (ModernBERT: RoPE, GeGLU) go through the same tasks, export and predict,
    attention pooling of windows included."""
    _modernbert_checkpoint(tiny, tmp_path / "modern")
    final = finetune(
        review_config(
            tiny,
            tmp_path / "run",
            f"model.init={tmp_path / 'modern'}",
            "train.epochs=1",
            f"data.aggregation={aggregation}",
        )
    )
    assert json.loads((final / "config.json").read_text())["model_type"] == "modernbert"
    assert (final / "window_pooler.safetensors").is_file() == (aggregation == "attention")
    texts = texts_of(tiny / "reviews_test.jsonl", "review")
    predicted = run_predict(final, texts, tmp_path)
    expected = [json.loads(line) for line in (final.parent / "test_predictions.jsonl").read_text().splitlines()]
    assert [p["score"] for p in predicted] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    if aggregation == "attention":
        return
    ner = finetune(ner_config(tiny, tmp_path / "ner", f"model.init={tmp_path / 'modern'}", "train.max_steps=2"))
    results = json.loads((ner.parent / "eval_results.json").read_text())
    rows = [json.loads(line) for line in (ner.parent / "test_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and results["test"]["f1"] == pytest.approx(entity_f1_reference(rows), abs=1e-9)


def _modernbert_checkpoint(tiny, where: Path) -> Path:
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    tokenizer = load_tokenizer(tiny / "ckpt")
    config = ModernBertConfig(
        vocab_size=padded_vocab_size(len(tokenizer), 64),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        global_attn_every_n_layers=1,
    )
    torch.manual_seed(0)
    ModernBertForMaskedLM(config).save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


@pytest.mark.parametrize("architecture", ["bert", "modernbert"])
@pytest.mark.parametrize("task", ["mean", "max", "attention", "ner"])
def test_every_export_is_whole(tiny, tmp_path, architecture, task):
    """Each architecture x task: the exported model reloads with its AutoModelFor* class with no missing or
    unexpected key (the task head included), and berth predict on the export gives the run's test predictions."""
    init = tiny / "ckpt" if architecture == "bert" else _modernbert_checkpoint(tiny, tmp_path / "modern")
    common = (f"model.init={init}", "train.max_steps=3", "train.eval_every=3")
    if task == "ner":
        final = finetune(ner_config(tiny, tmp_path / "run", *common))
        auto_class, texts = AutoModelForTokenClassification, texts_of(tiny / "ner_test.jsonl", "tokens")
    else:
        final = finetune(review_config(tiny, tmp_path / "run", *common, f"data.aggregation={task}"))
        auto_class, texts = AutoModelForSequenceClassification, texts_of(tiny / "reviews_test.jsonl", "review")
    config = json.loads((final / "config.json").read_text())
    prefix = {"bert": "Bert", "modernbert": "ModernBert"}[architecture]
    assert config["architectures"] == [auto_class.__name__.replace("AutoModel", prefix)]
    model, info = auto_class.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    saved = load_file(str(final / "model.safetensors"))
    head = "classifier.weight"
    assert head in saved and torch.equal(saved[head], model.state_dict()[head])

    predicted = run_predict(final, texts, tmp_path)
    expected = [json.loads(line) for line in (final.parent / "test_predictions.jsonl").read_text().splitlines()]
    if task == "ner":
        spans = [[(e["type"], e["start"], e["end"]) for e in row["entities"]] for row in expected]
        assert [[(e["type"], e["start"], e["end"]) for e in p["entities"]] for p in predicted] == spans
    else:
        assert [p["label"] for p in predicted] == [e["label"] for e in expected]
        assert [p["score"] for p in predicted] == pytest.approx([e["score"] for e in expected], abs=1e-5)


def test_a_non_finite_loss_stops_before_its_weights_are_evaluated_or_kept(tiny, tmp_path):
    cfg = review_config(
        tiny, tmp_path / "run", "train.lr=1e12", "train.warmup_ratio=0", "train.eval_every=1", "train.log_every=100"
    )
    with pytest.raises(BerthError, match=r"the loss is not finite at step (\d+); stopping") as caught:
        finetune(cfg)
    bad = int(re.search(r"at step (\d+);", str(caught.value)).group(1))
    evaluated = [m["step"] for m in read_metrics(tmp_path / "run") if "eval_loss" in m]
    assert evaluated and max(evaluated) < bad  # no evaluation of the weights that came from a non-finite loss
    for tensor in load_file(str(tmp_path / "run" / "best" / "model.safetensors")).values():
        assert torch.isfinite(tensor).all()


def test_robustness_is_reported_and_predict_agrees_on_its_documents(review_run, tiny, tmp_path):
    """The test reviews hidden among People's Daily paragraphs: every position and aggregation is reported, and
    `berth predict` on the same documents (rebuilt from the same seed) gives the reported accuracy."""
    from berth.finetune.hidden_text import POSITIONS, build_documents, distractor_paragraphs
    from berth.finetune.robustness import ROBUSTNESS_SEED

    results = json.loads((review_run / "eval_results.json").read_text())
    robustness = results["robustness"]
    assert robustness["source"] == "peoples_daily" and 0 < robustness["texts"] <= 24
    assert robustness["windows"]["min"] >= 3 and robustness["windows"]["max"] <= 8
    assert set(robustness["accuracy"]) == set(POSITIONS)
    for table in (*robustness["accuracy"].values(), robustness["alone"]):
        assert set(table) == set(WINDOW_AGGREGATIONS) and all(0.0 <= v <= 1.0 for v in table.values())

    tokenizer = load_tokenizer(review_run / "final")
    reviews, names = texts_of(tiny / "reviews_test.jsonl", "review"), texts_of(tiny / "reviews_test.jsonl", "sentiment")
    index = {"neg": 0, "pos": 1}
    paragraphs, _ = distractor_paragraphs("auto", tokenizer)
    settings = WindowSettings(max_seq_len=32, stride=16)
    docs = build_documents(reviews, [index[n] for n in names], paragraphs, tokenizer, settings, 200, ROBUSTNESS_SEED)
    predicted = run_predict(review_run / "final", docs.texts, tmp_path)
    chosen = results["test"]["aggregation"]
    for position in POSITIONS:
        rows = [d for d, p in enumerate(docs.positions) if p == position]
        right = sum(index[predicted[d]["label"]] == docs.labels[d] for d in rows) / len(rows)
        assert robustness["accuracy"][position][chosen] == pytest.approx(right, abs=1e-9)
    # document by document, for paired comparisons between runs
    marks = "".join("1" if index[predicted[d]["label"]] == docs.labels[d] else "0" for d in range(len(docs.texts)))
    assert robustness["right"][chosen] == marks
    for how, alone in robustness["alone_right"].items():
        assert len(alone) == robustness["texts"] and alone.count("1") / len(alone) == pytest.approx(
            robustness["alone"][how]
        )

    # the same documents from only the windows holding some of the review: the export's window logits, by hand
    from berth.finetune.hidden_text import text_windows
    from berth.finetune.pooling import aggregate

    model = AutoModelForSequenceClassification.from_pretrained(review_run / "final").eval()
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    own = {position: [] for position in POSITIONS}
    left_out = 0
    for d, doc in enumerate(text_windows(tokenizer, docs, settings)):
        cuts = [doc.ids[a:b] for (a, b), held in zip(doc.spans, doc.held, strict=True) if held]
        left_out += len(doc.spans) - len(cuts)
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor([cls, *c, sep]) for c in cuts], batch_first=True)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits  # [w, C]
        scored = aggregate(logits, torch.zeros(len(cuts), dtype=torch.long), 1, chosen)  # [1, C]
        own[docs.positions[d]].append(int(scored.argmax()) == docs.labels[d])
    assert left_out > 0  # distractor windows were left out, so this is not the documents' accuracy again
    for position in POSITIONS:
        expected = sum(own[position]) / len(own[position])
        assert robustness["text_windows_only"][position][chosen] == pytest.approx(expected, abs=1e-9)


def test_the_robustness_documents_do_not_move_with_the_training_seed(tiny, tmp_path):
    """Runs of different train.seed are compared on the same hidden documents."""
    from berth.finetune.classification import ClassificationTask
    from berth.finetune.hidden_text import build_documents, distractor_paragraphs
    from berth.finetune.robustness import NEWS, robustness_sets

    tokenizer = load_tokenizer(tiny / "ckpt")

    def documents(*overrides: str) -> list[str]:
        sets = robustness_sets(ClassificationTask(review_config(tiny, tmp_path / "r", *overrides), tokenizer))
        docs, source = sets[NEWS]
        assert source == "peoples_daily"
        return docs.texts

    drawn = documents("train.seed=0", "data.robustness_docs=6")
    assert len(drawn) == 3 * 6
    assert documents("train.seed=3", "data.robustness_docs=6") == drawn
    # the draw itself depends on its seed, so equal documents above mean the training seed did not reach it
    task = ClassificationTask(review_config(tiny, tmp_path / "r", "data.robustness_docs=6"), tokenizer)
    paragraphs, _ = distractor_paragraphs("auto", tokenizer)
    test = task.splits["test"]
    other = build_documents(task.texts["test"], test.doc_labels, paragraphs, tokenizer, task.settings, 6, 3)
    assert other.texts != drawn


@pytest.mark.slow
def test_outlier_exposure_draws_unrelated_windows_each_epoch_and_trains_them_flat(tiny, tmp_path):
    from berth.finetune.classification import ClassificationTask
    from berth.finetune.extra_text import UNIFORM

    tokenizer = load_tokenizer(tiny / "ckpt")
    task = ClassificationTask(review_config(tiny, tmp_path / "oe", "data.outlier_exposure=0.5"), tokenizer)
    windows = len(task.splits["train"].window_ids)
    units, lengths = task.train_units(0)
    assert len(units) == windows + round(0.5 * windows) and len(lengths) == len(units)
    outliers = [u for u in units if u[0] >= windows]
    batch = task.collate(outliers[:4])
    assert batch["labels"].tolist() == [UNIFORM] * 4
    assert task.train_units(1)[0][windows:] != outliers  # drawn anew each epoch
    plain = ClassificationTask(review_config(tiny, tmp_path / "plain"), tokenizer)
    assert plain.fingerprint() != task.fingerprint()  # a resume notices the change
    final = finetune(review_config(tiny, tmp_path / "oe", "data.outlier_exposure=0.5", "train.max_steps=3"))
    assert (final / "model.safetensors").is_file()
    with pytest.raises(
        BerthError, match=r": data.outlier_exposure=1.0 trains single windows .* not attention \(use data.hidden_"
    ):
        review_config(tiny, tmp_path / "x", "data.outlier_exposure=1", "data.aggregation=attention")


def test_hidden_training_adds_documents_with_a_text_among_unrelated_paragraphs(tiny, tmp_path):
    from berth.finetune.classification import ClassificationTask

    tokenizer = load_tokenizer(tiny / "ckpt")
    cfg = review_config(tiny, tmp_path / "mil", "data.aggregation=hierarchical", "data.hidden_training=0.5")
    task = ClassificationTask(cfg, tokenizer)
    train = task.splits["train"]
    hidden = task.extra.encoded
    assert 0 < len(hidden.doc_labels) <= round(0.5 * len(train.doc_labels))
    assert all(3 <= len(ws) <= 8 for ws in hidden.doc_windows)
    units, _ = task.train_units(0)
    assert len(units) == len(train.doc_labels) + len(hidden.doc_labels)
    batch = task.collate(units[-3:])
    expected = [hidden.doc_labels[hidden.window_doc[units[k][0] - len(train.window_ids)]] for k in (-3, -2, -1)]
    assert batch["labels"].tolist() == expected and min(expected) >= 0  # the hidden text's own label
    plain = review_config(tiny, tmp_path / "plain", "data.aggregation=hierarchical")
    assert ClassificationTask(plain, tokenizer).extra.encoded.doc_labels == []
    truncated = ("data.long_text=head", "data.stride=64", "train.compare_truncation=false")
    with pytest.raises(
        BerthError, match=r": data.hidden_training=1.0 trains on single texts .* \(not data.long_text=head\)"
    ):
        review_config(tiny, tmp_path / "x", "data.hidden_training=1", *truncated)


def test_hidden_training_with_window_aggregations_labels_each_window_by_what_it_holds(tiny, tmp_path):
    """Each window of a hidden document is trained on what it holds: the text's label when it holds at least
    half of the text, the flat target when it holds none of it (at most one such per document), left out
    between; checked against the characters each window covers."""
    from berth.finetune.classification import ClassificationTask, classification_loss
    from berth.finetune.extra_text import NEUTRAL_PER_DOCUMENT, UNIFORM
    from berth.finetune.windows import window_spans

    tokenizer = load_tokenizer(tiny / "ckpt")
    cfg = review_config(tiny, tmp_path / "hw", "data.hidden_training=1", "data.aggregation=mean")
    task = ClassificationTask(cfg, tokenizer)
    docs, train = task.extra.hidden, task.splits["train"]
    assert 0 < len(docs.texts) <= len(train.doc_labels) and NEUTRAL_PER_DOCUMENT == 1  # texts of a window or more: out

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    extra = task.extra.encoded
    windows = iter(zip(extra.window_ids, (extra.doc_labels[d] for d in extra.window_doc), strict=True))
    verdicts = neutrals = 0
    for d, document in enumerate(docs.texts):
        pieces = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
        first, last = docs.spans[d]
        own = count(document[first:last])
        verdict, neutral = [], []
        for a, b in window_spans(len(pieces["input_ids"]), 30, 16):
            low, high = pieces["offset_mapping"][a][0], pieces["offset_mapping"][b - 1][1]  # characters covered
            held = count(document[max(low, first) : min(high, last)]) if low < last and first < high else 0
            ids = [tokenizer.cls_token_id, *pieces["input_ids"][a:b], tokenizer.sep_token_id]
            if 2 * held >= own:
                verdict.append(ids)
            elif held == 0:
                neutral.append(ids)
        assert verdict  # a text shorter than a window is held by one
        for ids in verdict:
            assert next(windows) == (ids, docs.labels[d])
        for _ in range(min(len(neutral), 1)):
            ids, label = next(windows)
            assert ids in neutral and label == UNIFORM
        verdicts, neutrals = verdicts + len(verdict), neutrals + min(len(neutral), 1)
    assert next(windows, None) is None and verdicts > 0 and neutrals > 0
    units, _ = task.train_units(0)
    base = len(train.window_ids)
    assert units[base:] == [[base + w] for w in range(verdicts + neutrals)]  # every epoch, all of them
    assert task.collate(units[base:])["labels"].tolist() == [label for label in extra.doc_labels]
    assert "unit_weights" not in task.collate(units)  # data.hidden_weight=1: every unit counts once
    # data.hidden_weight: the hidden windows weigh less in the loss, the training windows as before
    light = ClassificationTask(
        review_config(tiny, tmp_path / "hw", "data.hidden_training=1", "data.hidden_weight=0.25"), tokenizer
    )
    mixed = units[base - 2 : base + 2]
    batch = light.collate(mixed)
    assert batch["unit_weights"].tolist() == [1.0, 1.0, 0.25, 0.25]
    model = light.build_model(str(tiny / "ckpt"), AutoConfig.from_pretrained(tiny / "ckpt"), False).eval()
    logits, _ = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    each = [classification_loss(logits[u : u + 1], batch["labels"][u : u + 1]) for u in range(4)]
    torch.testing.assert_close(light.loss(model, batch), each[0] + each[1] + 0.25 * (each[2] + each[3]))
    # the shipped sentiment config's settings: hidden-text training at a lower weight, the most decided window
    shipped = ("data.hidden_training=1", "data.hidden_weight=0.75", "data.aggregation=margin", "train.max_steps=3")
    final = finetune(review_config(tiny, tmp_path / "hw", *shipped))
    assert json.loads((final / "config.json").read_text())["berth"]["aggregation"] == "margin"
