"""In-domain neutral text (berth.finetune.neutral_text) and what is built from it: the in-domain robustness
documents and hidden-text training among the task's own sentences."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from berth.core.errors import BerthError
from berth.core.vocab import load_tokenizer
from berth.finetune.config import TaskData
from berth.finetune.extra_text import build_extra_text, hidden_documents
from berth.finetune.hidden_text import POSITIONS
from berth.finetune.neutral_text import (
    MIN_NEUTRAL_SENTENCES,
    evaluation_sentences,
    split_sentences,
    training_sentences,
    undecided,
)
from berth.finetune.robustness import IN_DOMAIN, robustness_sets
from berth.finetune.windows import WindowSettings, encode_texts

POSITIVE = ["好好好好好好好好。", "好好好好好好好好好好。", "棒棒好好好好好好。", "好好好棒棒棒棒棒。"]
NEGATIVE = ["差差差差差差差差。", "差差差差差差差差差差。", "坏坏差差差差差差。", "差差差坏坏坏坏坏。"]
UNSEEN = "甲乙丙丁戊己庚辛。"  # characters no training text has


def test_sentences_are_cut_at_sentence_ends_and_short_pieces_left_out():
    text = "房间很大，窗外是海。服务一般！\n早餐的种类不算很多…价格偏贵;我们住了三晚？"
    assert split_sentences(text) == ["房间很大，窗外是海。", "早餐的种类不算很多…"]
    assert split_sentences("短句。") == []


def test_a_sentence_is_neutral_when_the_model_leaves_it_near_chance():
    texts, labels = POSITIVE + NEGATIVE, [1] * 4 + [0] * 4
    assert undecided(texts, labels, ["好好好好好好好好好。", "差差差差差差差差差。", UNSEEN], seed=0) == [
        False,
        False,
        True,
    ]
    # a single class decides nothing, and nothing is neutral
    assert undecided(POSITIVE, [1] * 4, [UNSEEN], seed=0) == [False]


def test_training_sentences_are_judged_by_a_model_that_never_read_their_text():
    """A sentence that only two positive texts hold: a model of every training text calls it positive; judged by
    the other fold's model (which never read it, or read it once, below min_df) it is left undecided."""
    texts = [*POSITIVE, *NEGATIVE, UNSEEN, UNSEEN + "甲乙丙"] * 1
    labels = [1] * 4 + [0] * 4 + [1, 1]
    assert undecided(texts, labels, [UNSEEN], seed=0) == [False]
    assert training_sentences(texts, labels, seed=0).count(UNSEEN) == 2


def test_evaluation_sentences_come_from_the_validation_texts_in_a_seeded_shuffle():
    train, labels = POSITIVE + NEGATIVE, [1] * 4 + [0] * 4
    validation = [f"{UNSEEN}好好好好好好好好好。", "壬癸子丑寅卯辰巳。", "差差差差差差差差差。"]
    found = evaluation_sentences(train, labels, validation, seed=0)
    assert sorted(found) == sorted([UNSEEN, "壬癸子丑寅卯辰巳。"])
    assert found == evaluation_sentences(train, labels, validation, seed=0)


def test_hidden_training_among_two_pools_hides_half_the_texts_in_each_and_none_twice(zh_tokenizer_dir):
    tokenizer = load_tokenizer(zh_tokenizer_dir[2])
    settings = WindowSettings(max_seq_len=32, stride=16)
    texts = [f"第{i}条评论，质量很好。" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    news = [f"新闻段落第{i}段，今天天气晴朗，会议在北京召开。" for i in range(30)]
    own = [f"我们在周{'一二三四五'[i % 5]}下的单，快递第{i}天送到了门口。" for i in range(30)]
    docs = hidden_documents(texts, labels, [(news, "news"), (own, "own")], tokenizer, settings, 21, seed=0)
    assert len(docs.texts) == 21 and len(set(docs.source)) == 21  # no text hidden twice
    pools = []
    for d, text in enumerate(docs.texts):
        first, last = docs.spans[d]
        assert text[first:last] == texts[docs.source[d]] and docs.labels[d] == labels[docs.source[d]]
        assert docs.positions[d] in POSITIONS
        rest = text[:first] + text[last:]
        pools.append(("新闻" in rest, "下的单" in rest))
    assert sorted(pools).count((True, False)) == 11 and sorted(pools).count((False, True)) == 10
    # one pool: as before, every document among it
    alone = hidden_documents(texts, labels, [(own, "own")], tokenizer, settings, 21, seed=0)
    assert len(alone.texts) == 21 and all("新闻" not in t for t in alone.texts)


def evaluated_task(tokenizer, validation: list[str], docs: int = 6) -> SimpleNamespace:
    """What `robustness_sets` reads of a classification task (`berth.finetune.robustness.EvaluatedTask`)."""
    data = SimpleNamespace(distractors="", in_domain_robustness=True, robustness_docs=docs)
    test = [f"这本书第{i}章写得很好。" for i in range(10)]
    return SimpleNamespace(
        cfg=SimpleNamespace(data=data),
        tokenizer=tokenizer,
        settings=WindowSettings(max_seq_len=32, stride=16),
        pooling="",
        texts={"train": POSITIVE + NEGATIVE, "validation": validation, "test": test},
        splits={"train": SimpleNamespace(doc_labels=[1] * 4 + [0] * 4), "test": SimpleNamespace(doc_labels=[1] * 10)},
    )


def test_in_domain_robustness_hides_test_texts_among_the_validation_texts_neutral_sentences(zh_tokenizer_dir):
    tokenizer = load_tokenizer(zh_tokenizer_dir[2])
    neutral = [f"我们在周{'一二三四五'[i % 5]}下单，第{i}天送到。" for i in range(60)]
    validation = [f"{sentence}好好好好好好好好好。" for sentence in neutral]  # each with a verdict left out
    task = evaluated_task(tokenizer, validation)
    sets = robustness_sets(task)
    assert set(sets) == {IN_DOMAIN}  # no news without data.distractors
    docs, source = sets[IN_DOMAIN]
    assert source == "validation sentences left undecided"
    assert len(docs.alone) == 6 and docs.positions == list(POSITIONS) * 6
    for d, text in enumerate(docs.texts):
        first, last = docs.spans[d]
        assert text[first:last] == task.texts["test"][docs.source[d]]
        # sentence by sentence; the cut that makes room for the text falls at a sentence or clause end, and the
        # last sentence is cut short
        filler = [piece for piece in re.split("[\n。]", text[:first] + "\n" + text[last:]) if piece]
        assert filler and all(any(piece in s for s in neutral) for piece in filler)
        assert "好好好" not in text[:first] + text[last:]
    # too few neutral sentences: no in-domain evaluation rather than the same few sentences in every document
    assert robustness_sets(evaluated_task(tokenizer, validation[: MIN_NEUTRAL_SENTENCES - 1])) == {}


def test_hidden_training_among_in_domain_sentences_or_one_line_when_there_are_too_few(zh_tokenizer_dir):
    tokenizer = load_tokenizer(zh_tokenizer_dir[2])
    settings = WindowSettings(max_seq_len=32, stride=16)
    data = TaskData(hidden_training=0.5, hidden_filler="in_domain")
    neutral = [f"我们在周{'一二三四五'[i % 5]}下单，第{i}天送到。" for i in range(160)]
    verdicts = ["好好好好好好好好好。", "差差差差差差差差差。"]
    texts = [f"{sentence}{verdicts[i % 2]}" for i, sentence in enumerate(neutral)]
    labels = [1 - i % 2 for i in range(160)]
    train = encode_texts(tokenizer, texts, settings, labels=labels)
    extra = build_extra_text(data, 0, tokenizer, settings, train, texts, pooled=False)
    assert len(extra.hidden.texts) == 80
    for d, text in enumerate(extra.hidden.texts):
        first, last = extra.hidden.spans[d]
        rest = text[:first] + text[last:]
        assert "下单" in rest and "好好好" not in rest and "差差差" not in rest  # neutral sentences only around
    with pytest.raises(
        BerthError, match=r"^data.hidden_filler=in_domain: \d+ neutral sentences in the training texts, fewer than 50"
    ):
        build_extra_text(data, 0, tokenizer, settings, train, texts[:20], pooled=False)
