"""Exact values for the pieces of fine-tuning: windows, truncation, max context, BIO spans, aggregation, metrics."""

import math

import numpy as np
import pytest
import torch

from berth.finetune.batching import eval_order, length_grouped_batches, pad_rows
from berth.finetune.bio import bio_spans
from berth.finetune.metrics import load_metric
from berth.finetune.ner import Paragraph, token_predictions
from berth.finetune.pooling import HierarchicalPooler, WindowPooler, aggregate
from berth.finetune.windows import max_context_owner, truncate, window_spans


def test_window_spans_step_by_stride_and_align_the_last_window_to_the_end():
    assert window_spans(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert window_spans(11, 4, 3) == [(0, 4), (3, 7), (6, 10), (7, 11)]
    assert window_spans(5, 4, 4) == [(0, 4), (1, 5)]
    assert window_spans(4, 4, 2) == [(0, 4)]
    assert window_spans(0, 4, 2) == [(0, 0)]
    with pytest.raises(ValueError):
        window_spans(10, 4, 0)


def test_window_spans_cover_every_token_in_windows_of_full_length():
    for length in range(1, 60):
        spans = window_spans(length, 8, 3)
        covered = {p for start, end in spans for p in range(start, end)}
        assert covered == set(range(length))
        assert all(end - start == min(8, length) for start, end in spans)


def test_truncation_strategies():
    ids = list(range(10))
    assert truncate(ids, 4, "head") == [0, 1, 2, 3]
    assert truncate(ids, 4, "tail") == [6, 7, 8, 9]
    assert truncate(ids, 4, "head_tail", head_fraction=0.25) == [0, 7, 8, 9]
    assert truncate(ids, 4, "head_tail", head_fraction=0.5) == [0, 1, 8, 9]
    assert truncate(ids[:3], 4, "tail") == [0, 1, 2]
    with pytest.raises(ValueError, match="head_tail"):
        truncate(ids, 4, "middle")


def test_max_context_owner_follows_googles_rule():
    # position 2: min(2, 1) + 0.04 in span 0 beats min(0, 3) + 0.04 in span 1; position 3: span 1 wins.
    assert max_context_owner([(0, 4), (2, 6)], 6) == [0, 0, 0, 1, 1, 1]
    # position 2 sits at the edge of (0, 3) but in the middle of (1, 4); an uncovered position gets -1
    assert max_context_owner([(0, 3), (1, 4)], 5) == [0, 0, 1, 1, -1]
    assert max_context_owner([(0, 2), (0, 2)], 2) == [0, 0]  # a tie keeps the first span


def test_token_predictions_take_each_word_from_its_max_context_window():
    # 6 pieces, one word each; windows (0, 4) and (2, 6) as [CLS] + 4 pieces + [SEP]; 2 classes.
    paragraph = Paragraph(ids=list(range(6)), piece_word=list(range(6)), first_piece=list(range(6)), tags=[-1] * 6)
    paragraph.spans = [(0, 4), (2, 6)]
    first = np.zeros((6, 2), dtype=np.float32)
    second = np.zeros((6, 2), dtype=np.float32)
    first[1:5, 1] = 5.0  # window 0 says class 1 for its pieces 0-3
    second[1:5, 0] = 5.0  # window 1 says class 0 for its pieces 2-5
    tags, probs = token_predictions(paragraph, [first, second])
    assert tags.tolist() == [1, 1, 1, 0, 0, 0]  # piece 3 belongs to window 1 by max context
    assert np.allclose(probs, 1 / (1 + np.exp(-5.0)))


def test_words_without_pieces_are_predicted_outside():
    paragraph = Paragraph(ids=[7], piece_word=[1], first_piece=[-1, 0], tags=[-1, -1])
    paragraph.spans = [(0, 1)]
    logits = np.array([[0.0, 0.0], [0.0, 3.0], [0.0, 0.0]], dtype=np.float32)
    tags, _ = token_predictions(paragraph, [logits])
    assert tags.tolist() == [0, 1]


def test_bio_spans_read_tags_as_conlleval():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "B-ORG", "I-PER", "I-PER"]
    assert bio_spans(tags) == [("PER", 0, 2), ("LOC", 3, 5), ("ORG", 5, 6), ("ORG", 6, 7), ("PER", 7, 9)]
    assert bio_spans(["O", "O"]) == []
    assert bio_spans(["B-LOC"]) == [("LOC", 0, 1)]


def test_aggregate_mean_and_max_per_document():
    logits = torch.tensor([[1.0, 0.0], [3.0, -2.0], [0.0, 5.0], [-1.0, 1.0]])
    doc = torch.tensor([0, 0, 1, 0])
    assert torch.equal(aggregate(logits, doc, 2, "mean"), torch.tensor([[1.0, -1.0 / 3], [0.0, 5.0]]))
    assert torch.equal(aggregate(logits, doc, 2, "max"), torch.tensor([[3.0, 1.0], [0.0, 5.0]]))


# Windows with hand-picked probabilities: [3/4, 1/4], [1/2, 1/2] (flat), [1/10, 9/10] for document 0;
# [4/5, 1/5] for document 1, its only window.
HAND_LOGITS = torch.tensor([[math.log(3), 0.0], [0.0, 0.0], [0.0, math.log(9)], [math.log(4), 0.0]])
HAND_DOC = torch.tensor([0, 0, 0, 1])


def probabilities(scores):
    return torch.softmax(scores.double(), dim=-1)


def test_aggregate_prob_mean_is_the_mean_of_window_probabilities():
    got = probabilities(aggregate(HAND_LOGITS, HAND_DOC, 2, "prob_mean"))
    expected = torch.tensor([[(0.75 + 0.5 + 0.1) / 3, (0.25 + 0.5 + 0.9) / 3], [0.8, 0.2]], dtype=torch.double)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # [0.45, 0.55]


def test_aggregate_confidence_weights_windows_by_their_top_probability_above_chance():
    # weights 0.25, 0 (flat), 0.4: (0.25 [0.75, 0.25] + 0.4 [0.1, 0.9]) / 0.65 = [0.35, 0.65]
    got = probabilities(aggregate(HAND_LOGITS, HAND_DOC, 2, "confidence"))
    torch.testing.assert_close(got, torch.tensor([[0.35, 0.65], [0.8, 0.2]], dtype=torch.double), rtol=0, atol=1e-6)
    flat = torch.zeros(3, 2)  # every window flat: each counts the same, and the document is flat too
    torch.testing.assert_close(
        probabilities(aggregate(flat, torch.zeros(3, dtype=torch.long), 1, "confidence")),
        torch.full((1, 2), 0.5, dtype=torch.double),
        rtol=0,
        atol=1e-6,
    )


def test_aggregate_margin_takes_the_most_decided_window():
    # margins ln 3, 0, ln 9: the third window decides document 0
    got = probabilities(aggregate(HAND_LOGITS, HAND_DOC, 2, "margin"))
    torch.testing.assert_close(got, torch.tensor([[0.1, 0.9], [0.8, 0.2]], dtype=torch.double), rtol=0, atol=1e-6)
    tie = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # equal margins: the first window
    assert aggregate(tie, torch.tensor([0, 0]), 1, "margin").argmax().item() == 0
    diverged = torch.full((3, 2), float("nan"))  # NaN margins: NaN scores, which the run's finite check catches
    assert aggregate(diverged, torch.tensor([0, 0, 1]), 2, "margin").isnan().all()


def test_a_late_verdict_among_lukewarm_windows():
    """The case sliding windows exist for: four neutral windows scored 'positive' at 0.85 and one clear negative
    verdict at the end. The mean of logits or of probabilities sides with the many; the most decided window does
    not. (The max of raw logits depends on their scale, which a softmax does not fix: it is not asserted here.)"""
    lukewarm, verdict = [math.log(0.85 / 0.15), 0.0], [0.0, math.log(0.96 / 0.04)]
    logits = torch.tensor([lukewarm] * 4 + [verdict])  # class 0 positive, class 1 negative
    doc = torch.zeros(5, dtype=torch.long)
    assert [aggregate(logits, doc, 1, how).argmax().item() for how in ("mean", "prob_mean")] == [0, 0]
    assert aggregate(logits, doc, 1, "margin").argmax().item() == 1
    # weights 0.35 x 4 and 0.46: (1.4 x 0.15 + 0.46 x 0.96) / 1.86 = 0.35 negative: confidence still sides with the
    # many when the lukewarm windows are this sure of themselves
    torch.testing.assert_close(
        probabilities(aggregate(logits, doc, 1, "confidence"))[0, 1].item(),
        (1.4 * 0.15 + 0.46 * 0.96) / 1.86,
        rtol=0,
        atol=1e-6,
    )


def test_window_pooler_is_a_softmax_over_each_documents_windows():
    torch.manual_seed(0)
    pooler = WindowPooler(4)
    vectors = torch.randn(5, 4)
    doc = torch.tensor([0, 1, 0, 0, 1])
    pooled = pooler(vectors, doc, 2)
    scores = pooler.score(vectors).squeeze(-1)
    for d in range(2):
        rows = (doc == d).nonzero().squeeze(-1)
        weights = torch.softmax(scores[rows], dim=0)
        assert torch.allclose(pooled[d], (weights[:, None] * vectors[rows]).sum(0), atol=1e-6)


def test_length_grouped_batches_cover_the_epoch_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=1000).tolist()
    grouped = length_grouped_batches(lengths, 16, seed=1, epoch=0)
    plain = length_grouped_batches(lengths, 16, seed=1, epoch=0, group_by_length=False)
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == list(range(1000))
    assert grouped == length_grouped_batches(lengths, 16, seed=1, epoch=0)
    assert grouped != length_grouped_batches(lengths, 16, seed=1, epoch=1)

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(grouped) < 0.7 * padded(plain)


def test_pad_rows_and_eval_order():
    assert pad_rows([[1, 2, 3], [4]], 0, multiple=4).tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert [b.rows for b in eval_order([3, 9, 1, 5], 2)] == [[1, 3], [0, 2]]
    assert [b.rows for b in eval_order([3, 9, 1, 5], 2, rank=1, processes=2)] == [[1, 3]]


def test_local_metric_modules_give_exact_values():
    accuracy = load_metric("accuracy").compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2])
    assert accuracy == {"accuracy": 0.75}
    f1 = load_metric("f1").compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2], num_labels=3)
    # class 0: p=r=1; class 1: p=1/2, r=1; class 2: p=1, r=1/2
    assert f1["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert f1["micro_f1"] == pytest.approx(0.75)
    entities = load_metric("entity_f1").compute(
        predictions=[["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]],
        references=[["B-PER", "I-PER", "O", "O"], ["O", "B-ORG"]],
    )
    assert entities["precision"] == pytest.approx(2 / 3)
    assert entities["recall"] == pytest.approx(1.0)
    assert entities["PER_f1"] == 1.0 and entities["LOC_precision"] == 0.0 and entities["LOC_number"] == 0


def test_f1_module_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 4, 500).tolist(), rng.integers(0, 4, 500).tolist()
    ours = load_metric("f1").compute(predictions=predictions, references=references, num_labels=4)
    assert ours["macro_f1"] == pytest.approx(metrics.f1_score(references, predictions, average="macro"))
    assert ours["micro_f1"] == pytest.approx(metrics.f1_score(references, predictions, average="micro"))


def test_unknown_metric_names_the_shipped_ones():
    with pytest.raises(ValueError, match="accuracy, entity_f1, f1"):
        load_metric("bleu")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_modernbert_window_vectors_give_the_models_own_logits(pooling):
    """Attention pooling reads ModernBERT's window vectors; through its classifier they give exactly the
    logits of ModernBertForSequenceClassification itself."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    from berth.finetune.modeling import WindowClassifier

    config = ModernBertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=3,
        classifier_pooling=pooling,
    )
    torch.manual_seed(0)
    model = ModernBertForSequenceClassification(config).eval()
    input_ids = torch.randint(5, 64, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    logits, vectors = WindowClassifier(model, "attention")(input_ids, torch.zeros_like(input_ids), attention_mask)
    assert vectors.shape == (3, 32)
    expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.allclose(logits, expected, atol=1e-6)


def test_a_class_label_of_minus_one_is_a_missing_label_never_the_last_class():
    import datasets

    from berth.core.errors import BerthError
    from berth.finetune.data import Split, check_labels, label_values

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})

    def split(labels):
        rows = datasets.Dataset.from_dict({"text": ["a"] * len(labels), "label": labels}, features=features)
        return Split("test", rows, "hub:test")

    mixed = split([1, -1, 0])
    assert label_values(mixed, "label") == ["pos", "", "neg"]  # not "pos" for -1
    with pytest.raises(BerthError, match=r"^hub:test row 1: missing label in column 'label'$"):
        check_labels(mixed, label_values(mixed, "label"), ["neg", "pos"], "label", training_labels=True)
    unlabelled = split([-1, -1])
    with pytest.raises(BerthError, match=r"^hub:test: no labels in column 'label' \(all missing or -1: an unlabelled"):
        check_labels(unlabelled, label_values(unlabelled, "label"), ["neg", "pos"], "label", training_labels=True)


def test_robustness_documents_hide_each_text_at_every_position_in_3_to_8_windows(zh_tokenizer_dir):
    from berth.core.vocab import load_tokenizer
    from berth.corpora.embedded import reviews_sentiment
    from berth.finetune.hidden_text import POSITIONS, build_documents, distractor_paragraphs
    from berth.finetune.windows import WindowSettings, encode_texts

    tokenizer = load_tokenizer(zh_tokenizer_dir[2])
    test = reviews_sentiment()["test"]
    texts, labels = test["text"][:60], test["label"][:60]
    settings = WindowSettings(max_seq_len=64, stride=32)
    paragraphs, source = distractor_paragraphs("auto", tokenizer)
    assert source == "peoples_daily" and 1000 < len(paragraphs) < 2000  # People's Daily's test share
    docs = build_documents(texts, labels, paragraphs, tokenizer, settings, 12, seed=0)
    again = build_documents(texts, labels, paragraphs, tokenizer, settings, 12, seed=0)
    assert docs.texts == again.texts  # seeded
    assert len(docs.alone) == 12 and len(docs.texts) == 36
    assert docs.positions == list(POSITIONS) * 12
    for d, document in enumerate(docs.texts):
        own = docs.alone[d // 3]
        assert own == texts[docs.source[d]] and docs.labels[d] == labels[docs.source[d]]
        assert document.count(own) == 1
        start, end = docs.spans[d]
        assert document[start:end] == own  # where the text sits, for labelling training windows
        at = document.index(own) / (len(document) - len(own))  # 0 at the start, 1 at the end
        expected = {"start": (0.0, 0.0), "middle": (0.25, 0.75), "end": (1.0, 1.0)}[docs.positions[d]]
        assert expected[0] <= at <= expected[1], (docs.positions[d], at)
    windows = [len(ws) for ws in encode_texts(tokenizer, docs.texts, settings).doc_windows]
    assert min(windows) >= 3 and max(windows) <= 8
    assert len(set(windows)) >= 3  # the lengths vary
    # a text as long as a window is not hidden: it is left out
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) < 62 for t in docs.alone)
    # training documents: the same texts and fillers, each at one position drawn per text (all three drawn)
    drawn = build_documents(texts, labels, paragraphs, tokenizer, settings, 12, seed=0, every_position=False)
    assert drawn.alone == docs.alone and len(drawn.texts) == 12 and len(set(drawn.positions)) == 3
    for d, document in enumerate(drawn.texts):
        assert document == docs.texts[3 * d + POSITIONS.index(drawn.positions[d])]
        assert drawn.spans[d] == docs.spans[3 * d + POSITIONS.index(drawn.positions[d])]


def test_text_windows_count_the_hidden_text_in_each_window(zh_tokenizer_dir):
    """By hand: one token per Chinese character, 7 before the text, the text's 4, 5 after; windows of 6 tokens
    3 apart, the last aligned to the end."""
    from berth.core.vocab import load_tokenizer
    from berth.finetune.hidden_text import HiddenSet, text_windows
    from berth.finetune.windows import WindowSettings

    tokenizer = load_tokenizer(zh_tokenizer_dir[2])
    document = "大" * 7 + "好" * 4 + "中" * 5
    docs = HiddenSet(texts=[document], labels=[1], positions=["middle"], source=[0], spans=[(7, 11)])
    [found] = text_windows(tokenizer, docs, WindowSettings(max_seq_len=8, stride=3))
    assert len(found.ids) == 16 and found.own == 4
    assert found.spans == [(0, 6), (3, 9), (6, 12), (9, 15), (10, 16)]
    assert found.held == [0, 2, 4, 2, 1]


def test_hidden_documents_are_cut_exactly_as_encode_texts_cuts_them(zh_tokenizer_dir):
    """The robustness evaluation tokenizes its documents once (encode_hidden, with offsets) where the natural test
    split goes through encode_texts: same windows, lengths and labels, or the two columns would not compare."""
    from berth.core.vocab import load_tokenizer
    from berth.finetune.hidden_text import HiddenSet, encode_hidden
    from berth.finetune.windows import WindowSettings, encode_texts

    tokenizer = load_tokenizer(zh_tokenizer_dir[2])
    texts = ["大" * 7 + "好" * 4 + "中" * 5, "好" * 3, "中文新闻。" * 9 + "很好"]
    docs = HiddenSet(
        texts=texts,
        labels=[1, 0, 1],
        positions=["middle", "start", "end"],
        source=[0, 1, 2],
        spans=[(7, 11), (0, 3), (45, 47)],
    )
    settings = WindowSettings(max_seq_len=8, stride=3)
    got, found = encode_hidden(tokenizer, docs, settings)
    want = encode_texts(tokenizer, texts, settings, labels=[1, 0, 1])
    assert got == want
    assert [len(ws) for ws in got.doc_windows] == [5, 1, len(found[2].spans)] and len(found[2].spans) > 5
    assert [doc.own for doc in found] == [4, 3, 2]


def test_distractors_from_a_file_and_the_errors_of_a_bad_one(tmp_path, zh_tokenizer_dir):
    from berth.core.errors import BerthError
    from berth.core.vocab import load_tokenizer
    from berth.finetune.hidden_text import distractor_paragraphs

    tokenizer = load_tokenizer(zh_tokenizer_dir[2])
    good = tmp_path / "news.txt"
    good.write_text("短行\n" + "这是一段足够长的无关新闻文字，用来隐藏评论的结论。\n" * 3, encoding="utf-8")
    paragraphs, source = distractor_paragraphs(str(good), tokenizer)
    assert len(paragraphs) == 3 and source == str(good)  # the short line is left out
    assert distractor_paragraphs("", tokenizer) == ([], "")
    with pytest.raises(BerthError, match=r"^data.distractors=.*missing.txt: no such file"):
        distractor_paragraphs(str(tmp_path / "missing.txt"), tokenizer)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe" * 20)
    with pytest.raises(BerthError, match=r"^data.distractors=.*bad.txt: not UTF-8 text"):
        distractor_paragraphs(str(bad), tokenizer)


def test_hierarchical_pooler_equals_a_transformer_block_computed_by_hand_per_document():
    """A post-LN block over [CLS] + each document's windows (+ window positions), computed here with matmuls for
    each document alone: equal to the pooler's batched, padded result, so the padding mask holds."""
    torch.manual_seed(0)
    hidden = 8
    pooler = HierarchicalPooler(hidden, layers=1, max_windows=4, dropout=0.0).eval()
    vectors = torch.randn(5, hidden)
    doc = torch.tensor([0, 1, 0, 1, 0])  # interleaved: document 0 is windows 0, 2, 4 in that order
    got = pooler(vectors, doc, 2)

    block = pooler.encoder.layers[0]
    attention = block.self_attn

    def layer_norm(x, norm):
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight + norm.bias

    def by_hand(windows):
        x = torch.cat([pooler.cls[None], windows]) + pooler.positions.weight[: len(windows) + 1]  # [1 + n, H]
        q, k, v = (x @ attention.in_proj_weight.T + attention.in_proj_bias).split(hidden, -1)  # one head (H < 64)
        mixed = torch.softmax(q @ k.T / math.sqrt(hidden), -1) @ v
        x = layer_norm(x + mixed @ attention.out_proj.weight.T + attention.out_proj.bias, block.norm1)
        inner = x @ block.linear1.weight.T + block.linear1.bias
        inner = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))  # GELU
        x = layer_norm(x + inner @ block.linear2.weight.T + block.linear2.bias, block.norm2)
        return x[0]

    with torch.no_grad():
        expected = torch.stack([by_hand(vectors[[0, 2, 4]]), by_hand(vectors[[1, 3]])])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert HierarchicalPooler.layers_in(pooler.state_dict()) == 1


def test_outlier_windows_are_trained_towards_the_uniform_distribution():
    from berth.finetune.classification import classification_loss
    from berth.finetune.extra_text import UNIFORM

    logits = torch.tensor([[2.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]])
    labels = torch.tensor([1, UNIFORM, UNIFORM])
    # unit 0: -log(1 / (1 + e^2)); unit 1: probabilities 3/4, 1/4: -(log 3/4 + log 1/4) / 2; unit 2: flat, log 2
    expected = math.log(1 + math.exp(2)) - (math.log(0.75) + math.log(0.25)) / 2 + math.log(2)
    assert classification_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # a flat outlier window is at its minimum: its gradient is zero
    flat = torch.zeros(1, 3, requires_grad=True)
    classification_loss(flat, torch.tensor([UNIFORM])).backward()
    torch.testing.assert_close(flat.grad, torch.zeros(1, 3), rtol=0, atol=1e-7)
    weighted = classification_loss(logits[:1], labels[:1], torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx(3 * math.log(1 + math.exp(2)), rel=1e-6)
    # unit weights (hidden-text windows): unit 0 counted once, unit 1 a quarter, unit 2 not at all
    by_unit = classification_loss(logits, labels, unit_weights=torch.tensor([1.0, 0.25, 0.0]))
    expected = math.log(1 + math.exp(2)) - 0.25 * (math.log(0.75) + math.log(0.25)) / 2
    assert by_unit.item() == pytest.approx(expected, rel=1e-6)


def test_evaluating_turns_dropout_off_and_gives_the_model_back_in_its_own_mode():
    """Evaluation during training hands a training model back; predict's eval model stays in eval (it used to be
    left in train mode, dropout on, after every call)."""
    from berth.finetune.batching import evaluating

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    for mode in (True, False):
        model.train(mode)
        with evaluating(model):
            assert not model.training and not model[1].training
        assert model.training is mode and model[1].training is mode
    model.train()
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("a failed batch")
    assert model.training


def test_auto_picks_each_window_aggregation_where_it_is_the_right_one():
    """For each aggregation in turn, validation documents that it labels right and every other one gets wrong at
    least once (documents where two aggregations disagree, labelled by the one under test): auto must pick it."""
    from berth.finetune.classification import choose_aggregation
    from berth.finetune.pooling import WINDOW_AGGREGATIONS

    rng = np.random.default_rng(0)
    pool = [torch.tensor(rng.uniform(-4, 4, (rng.integers(2, 5), 3)), dtype=torch.float32) for _ in range(400)]

    def predict(windows, how):  # windows [W, C] of one document
        return int(aggregate(windows, torch.zeros(len(windows), dtype=torch.long), 1, how).argmax())

    predictions = [{how: predict(w, how) for how in WINDOW_AGGREGATIONS} for w in pool]
    for right in WINDOW_AGGREGATIONS:
        documents = []  # (its predictions, label)
        for other in WINDOW_AGGREGATIONS:
            if other != right:
                found = next(p for p in predictions if p[right] != p[other])
                documents.append((found, found[right]))
        results = {
            how: {"accuracy": sum(p[how] == label for p, label in documents) / len(documents)}
            for how in WINDOW_AGGREGATIONS
        }
        assert results[right]["accuracy"] == 1.0 and max(r["accuracy"] for h, r in results.items() if h != right) < 1
        assert choose_aggregation(results, "accuracy") == right
        # a loss: lower is better
        losses = {how: {"loss": 1.0 - r["accuracy"]} for how, r in results.items()}
        assert choose_aggregation(losses, "loss") == right
    # a tie goes to the first listed (mean); pooled aggregations are not auto's to pick
    tie = {how: {"accuracy": 0.5} for how in (*WINDOW_AGGREGATIONS, "attention")}
    assert choose_aggregation(tie, "accuracy") == "mean"
    assert choose_aggregation({**tie, "attention": {"accuracy": 1.0}}, "accuracy") == "mean"


def test_train_examples_keeps_n_training_rows_and_every_evaluation_row(tmp_path):
    import json as _json

    from berth.finetune.config import TaskData
    from berth.finetune.data import load_splits

    files = {}
    for split, n in (("train", 50), ("validation", 20), ("test", 30)):
        files[split] = tmp_path / f"{split}.jsonl"
        rows = [{"text": f"{split} {i}", "label": str(i % 2)} for i in range(n)]
        files[split].write_text("\n".join(_json.dumps(r) for r in rows) + "\n")
    paths = {"dataset": "", **{f"{s}_file": str(p) for s, p in files.items()}}
    splits = load_splits(TaskData(**paths, train_examples=10))
    assert {name: s.rows.num_rows for name, s in splits.items()} == {"train": 10, "validation": 20, "test": 30}
    kept = set(splits["train"].rows["text"])
    assert kept != {f"train {i}" for i in range(10)}  # a seeded draw, not the first rows
    assert kept == set(load_splits(TaskData(**paths, train_examples=10))["train"].rows["text"])
    assert load_splits(TaskData(**paths, max_examples=10))["test"].rows.num_rows == 10
