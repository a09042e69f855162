import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, BertTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from berth.core.config import load_config
from berth.core.errors import BerthError
from berth.core.vocab import load_tokenizer
from berth.corpora.embedded import NAMED_CORPORA
from berth.tokenizer.config import TokenizerJobConfig, WordPieceConfig
from berth.tokenizer.train import (
    SPECIAL_TOKENS,
    build_wordpiece,
    corpus_alphabet,
    is_built,
    save_tokenizer,
    train_tokenizer,
    train_wordpiece,
)

HAND_VOCAB = [
    *SPECIAL_TOKENS,  # 0-4
    "我",
    "爱",
    "北",
    "京",
    "天",
    "安",
    "门",
    "。",  # 5-12
    "hello",
    "world",
    ",",
    "!",  # 13-16
    "un",
    "##aff",
    "##able",
    "cafe",
    "naive",
    "café",  # 17-22
    "12",
    "##3",
    "a",
    "##a",  # 23-26
]
IDS = {token: i for i, token in enumerate(HAND_VOCAB)}


@pytest.fixture(scope="module")
def hand_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("hand")
    save_tokenizer(build_wordpiece(WordPieceConfig(), vocab=IDS), WordPieceConfig(), out)
    return AutoTokenizer.from_pretrained(str(out)), out


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("我爱北京天安门。", ["我", "爱", "北", "京", "天", "安", "门", "。"]),
        ("Hello, World!", ["hello", ",", "world", "!"]),
        ("我爱hello世界", ["我", "爱", "hello", "[UNK]", "[UNK]"]),
        ("Café NAÏVE", ["cafe", "naive"]),
        ("unaffable!!", ["un", "##aff", "##able", "!", "!"]),
        ("123 12", ["12", "##3", "12"]),
        ("hello 😀 hello😀", ["hello", "[UNK]", "[UNK]"]),
        ("", []),
        ("   \t\n", []),
        ("a" * 100, ["a", *["##a"] * 99]),
        ("a" * 300, ["[UNK]"]),
        ("hello\x00\ufffdworld", ["helloworld"]),
    ],
)
def test_exact_tokens_on_hand_written_inputs(hand_tokenizer, text, tokens):
    tok, _ = hand_tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # a word that cannot be pieced together is one [UNK]
    expected = [IDS.get(t, IDS["[UNK]"]) for t in tokens]
    assert ids == expected
    assert tok.convert_ids_to_tokens(ids) == [t if t in IDS else "[UNK]" for t in tokens]


def test_special_tokens_have_fixed_low_ids(hand_tokenizer):
    tok, _ = hand_tokenizer
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert tok("")["input_ids"] == [2, 3]
    pair = tok("我爱", "hello")
    assert pair["input_ids"] == [2, 5, 6, 3, 13, 3]
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1]
    assert tok.decode([2, 17, 18, 19, 3], skip_special_tokens=True) == "unaffable"


def test_cased_tokenizer_keeps_accents_and_case(tmp_path):
    cfg = WordPieceConfig(lowercase=False)
    save_tokenizer(build_wordpiece(cfg, vocab=IDS), cfg, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.convert_ids_to_tokens(tok("café Hello")["input_ids"]) == ["[CLS]", "café", "[UNK]", "[SEP]"]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["do_lower_case"] is False


def test_saved_files_and_vocab_txt_alone_give_the_same_ids(hand_tokenizer):
    tok, out = hand_tokenizer
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    assert (out / "vocab.txt").read_text(encoding="utf-8").splitlines() == HAND_VOCAB
    from_vocab = BertTokenizer(vocab=str(out / "vocab.txt"))
    reference = BertTokenizerLegacy(vocab_file=str(out / "vocab.txt"))
    text = "我爱北京 Hello, unaffable café 123 😀 " + "a" * 300
    assert tok(text)["input_ids"] == from_vocab(text)["input_ids"] == reference(text)["input_ids"]


def test_training_on_a_small_corpus(tmp_path):
    corpus = ["the running runner runs", "running and runs", "北京天安门", "天安门 北京"] * 20 + ["rare 鸁"]
    cfg = WordPieceConfig(vocab_size=60, min_frequency=2, limit_alphabet=16)  # 17 distinct characters
    tok = train_wordpiece(build_wordpiece(cfg), corpus, cfg, progress=False)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert len(vocab) <= 60
    assert "鸁" not in vocab  # seen once: past the alphabet cap, so it is [UNK]
    assert tok.encode("天安门").tokens == ["[CLS]", "天", "安", "门", "[SEP]"]
    assert tok.encode("鸁").tokens == ["[CLS]", "[UNK]", "[SEP]"]
    assert "##s" in vocab or "runs" in vocab


def test_corpus_alphabet_breaks_ties_by_character_and_lists_continuing_pieces():
    tok = build_wordpiece(WordPieceConfig())
    # lowercased: a 2, b 2, c 1, 北 1, 京 1 (one word each); ties go to the lower code point (京 U+4EAC < 北 U+5317)
    alphabet, pieces = corpus_alphabet(tok, ["Ba ab", "c 北京"], limit=4)
    assert alphabet == ["a", "b", "c", "京"]
    assert pieces == ["##a", "##b"]  # a continues "ba", b continues "ab"; no other character continues a word


def test_training_gives_the_same_vocabulary_every_time():
    """tokenizers' own trainer gave 5 different vocabularies in 5 runs on this corpus (its ## pieces are numbered
    in hash-map order and break ties between equally frequent merges, huggingface/tokenizers#1794)."""
    words = [f"{a}{b}{c}" for a in "abcdefgh" for b in "ijklmnop" for c in "qrstuvwx"]
    corpus = [" ".join(words[i : i + 16]) for i in range(0, len(words), 16)] * 2  # every merge ties
    cfg = WordPieceConfig(vocab_size=120, min_frequency=2)
    vocabs = [train_wordpiece(build_wordpiece(cfg), corpus, cfg, progress=False).get_vocab() for _ in range(5)]
    assert len(vocabs[0]) == 120
    assert all(vocab == vocabs[0] for vocab in vocabs[1:])
    # canonical ids: special tokens, then whole-word pieces, then ## pieces, each sorted
    tokens = sorted(vocabs[0], key=vocabs[0].get)
    rest = tokens[len(SPECIAL_TOKENS) :]
    assert tokens[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert rest == sorted(rest, key=lambda t: (t.startswith("##"), t))


def test_a_trained_tokenizer_keeps_only_the_real_special_tokens(tmp_path):
    corpus = ["the running runner runs", "running and runs"] * 10
    cfg = WordPieceConfig(vocab_size=60)
    save_tokenizer(train_wordpiece(build_wordpiece(cfg), corpus, cfg, progress=False), cfg, tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert [t["content"] for t in saved["added_tokens"]] == list(SPECIAL_TOKENS)  # the ## pieces are plain pieces
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.tokenize("##s runs") == tok.tokenize("# # s runs")  # "##s" in text is not one token


def test_training_a_corpus_without_text_fails_clearly():
    cfg = WordPieceConfig(vocab_size=50)
    with pytest.raises(BerthError, match="only special tokens"):
        train_wordpiece(build_wordpiece(cfg), ["", "   "], cfg, progress=False)


def test_load_tokenizer_from_a_directory_without_one(tmp_path):
    with pytest.raises(BerthError, match="no tokenizer here"):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def embedded_tokenizer(zh_tokenizer_dir):
    cfg, summary, _ = zh_tokenizer_dir
    return cfg, summary


def test_train_on_the_embedded_corpus(embedded_tokenizer):
    cfg, summary = embedded_tokenizer
    out = Path(summary["output_dir"])
    assert 5_000 < summary["vocab_size"] <= cfg.tokenizer.vocab_size
    assert summary["heldout"]["documents"] > 100
    assert summary["heldout"]["unk_rate"] < 0.005
    assert 0.9 < summary["heldout"]["tokens_per_char"] < 1.0  # one token per CJK character, fewer for numbers
    assert is_built(cfg)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert load_config(TokenizerJobConfig, out / "config.yaml") == cfg
    tok = load_tokenizer(out)
    assert tok.convert_ids_to_tokens(tok("人民日报")["input_ids"]) == ["[CLS]", "人", "民", "日", "报", "[SEP]"]


def test_reuse_only_when_the_config_is_unchanged(embedded_tokenizer):
    cfg, summary = embedded_tokenizer
    assert train_tokenizer(cfg, reuse=True) == summary
    changed = load_config(TokenizerJobConfig, None, [f"output_dir={cfg.output_dir}", "tokenizer.vocab_size=7000"])
    assert not is_built(changed)


@pytest.mark.slow
def test_fast_tokenizer_matches_vocab_txt_tokenizer_on_the_whole_embedded_corpus(embedded_tokenizer):
    _, summary = embedded_tokenizer
    out = summary["output_dir"]
    fast = load_tokenizer(out)
    reference = BertTokenizerLegacy(vocab_file=f"{out}/vocab.txt", do_lower_case=True)
    texts = [
        t
        for name in (
            "peoples_daily_paragraphs",
            "reviews_sentiment:train",
            "reviews_sentiment:validation",
            "reviews_sentiment:test",
        )
        for t in NAMED_CORPORA[name]()["text"]
    ]
    assert len(texts) > 35_000
    fast_ids = fast(texts, add_special_tokens=False, verbose=False)["input_ids"]
    mismatches = [
        t for t, ids in zip(texts, fast_ids, strict=True) if reference.encode(t, add_special_tokens=False) != ids
    ]
    assert mismatches == []
