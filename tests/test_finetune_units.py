"""Exact values for the pieces of fine-tuning: windows, truncation, max context, BIO spans, aggregation, metrics."""

import numpy as np
import pytest
import torch

from berth.finetune.batching import eval_order, length_grouped_batches, pad_rows
from berth.finetune.bio import bio_spans
from berth.finetune.classification import WindowPooler, aggregate
from berth.finetune.metrics import load_metric
from berth.finetune.ner import Paragraph, token_predictions
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
    assert eval_order([3, 9, 1, 5], 2) == [[1, 3], [0, 2]]
    assert eval_order([3, 9, 1, 5], 2, rank=1, processes=2) == [[1, 3]]


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

    from berth.finetune.classification import WindowClassifier

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
    logits, vectors = WindowClassifier(model, attention=True)(input_ids, torch.zeros_like(input_ids), attention_mask)
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
