import json
import random
import subprocess
import sys

import numpy as np
import pytest

from berth.core.config import load_config
from berth.core.errors import BerthError
from berth.core.vocab import load_tokenizer
from berth.pretrain.config import DataConfig, PretrainConfig
from berth.pretrain.data import (
    Document,
    ExampleBuilder,
    RandomSegments,
    Span,
    document_pairs,
    pack_documents,
    renumber,
    truncate_pair,
)
from berth.pretrain.documents import (
    DocumentEncoder,
    SpecialIds,
    align_words,
    check_seq_len,
    check_tokenizer,
    sentence_token_ends,
)
from berth.pretrain.prepare import prepare, prepare_documents
from berth.pretrain.sentences import split_sentences
from berth.tokenizer.config import WordPieceConfig
from berth.tokenizer.train import SPECIAL_TOKENS, build_wordpiece, save_tokenizer

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, vocab_size=1000)


class Scripted(random.Random):
    """A random source whose draws are fixed: random() always `value`, randint/randrange their lowest value."""

    def __init__(self, value):
        super().__init__(0)
        self.value = value

    def random(self):
        return self.value

    def randint(self, a, b):
        return a

    def randrange(self, start, stop=None, step=1):
        return 0 if stop is None else start


# ---------------------------------------------------------------------------------------------------------------
# sentences, words, documents


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        (
            "我爱北京。天安门很大！你去过吗？“去过。”他说。",
            ["我爱北京。", "天安门很大！", "你去过吗？", "“去过。”", "他说。"],
        ),
        ("第一句；第二句……第三句", ["第一句；", "第二句……", "第三句"]),
        ("Hello world. It is 3.14 today! Really? yes", ["Hello world.", "It is 3.14 today!", "Really?", "yes"]),
        ("see www.example.com now. ok", ["see www.example.com now.", "ok"]),
        ("行一\n行二\n\n行三", ["行一", "行二", "行三"]),
        ("没有标点", ["没有标点"]),
        ("  。。  ", ["。。"]),
        ("", []),
    ],
)
def test_sentence_split(text, sentences):
    assert split_sentences(text) == sentences


def test_align_words_with_a_segmentation():
    # 我 爱 北 京 天 安 门, segmented 我 / 爱 / 北京 / 天安门
    offsets = [(i, i + 1) for i in range(7)]
    continuation = np.zeros(10, dtype=bool)
    assert align_words(offsets, list(range(7)), continuation, [0, 1, 2, 4]) == [0, 1, 2, 2, 3, 3, 3]
    # without one, every token not marked ## is a word
    assert align_words(offsets, list(range(7)), continuation, None) == [0, 1, 2, 3, 4, 5, 6]


def test_align_words_keeps_wordpiece_continuations_together():
    # "unaffable runs": un ##aff ##able runs (ids 5 6 7 8; 6 and 7 are ## pieces)
    continuation = np.zeros(10, dtype=bool)
    continuation[[6, 7]] = True
    offsets = [(0, 2), (2, 5), (5, 9), (10, 14)]
    assert align_words(offsets, [5, 6, 7, 8], continuation, None) == [0, 0, 0, 1]
    # a segmentation that cuts inside "unaffable" cannot split a WordPiece word
    assert align_words(offsets, [5, 6, 7, 8], continuation, [0, 4, 10]) == [0, 0, 0, 1]


def test_token_straddling_two_segmented_words_goes_with_the_first():
    # tokens "1998" (0-4) and "年" (4-5); segmentation 19 / 98年
    assert align_words([(0, 4), (4, 5)], [5, 6], np.zeros(10, dtype=bool), [0, 2]) == [0, 1]


def test_sentence_token_ends():
    # tokens at chars 0 1 2 | 3 4 | 5 ; sentences end at chars 3, 5, 6
    offsets = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert sentence_token_ends(offsets, [3, 5, 6]) == [3, 5, 6]
    # a sentence with no tokens (only spaces) disappears
    assert sentence_token_ends([(0, 1), (5, 6)], [1, 3, 6]) == [1, 2]


@pytest.fixture(scope="module")
def hand_tokenizer(tmp_path_factory):
    vocab = [
        *SPECIAL_TOKENS,
        "我",
        "爱",
        "北",
        "京",
        "天",
        "安",
        "门",
        "。",
        "很",
        "大",
        "！",
        "un",
        "##aff",
        "##able",
        "runs",
    ]
    out = tmp_path_factory.mktemp("hand-tok")
    save_tokenizer(
        build_wordpiece(WordPieceConfig(), vocab={t: i for i, t in enumerate(vocab)}), WordPieceConfig(), out
    )
    return load_tokenizer(out)


def test_document_encoder_exact(hand_tokenizer):
    encode = DocumentEncoder(hand_tokenizer, "auto", eval_fraction=0.0)
    out = encode(
        {
            "text": ["我爱北京。天安门很大！", "unaffable runs", ""],
            "words": [["我", "爱", "北京", "。", "天安门", "很", "大", "！"], None, None],
        }
    )
    assert out["input_ids"] == [[5, 6, 7, 8, 12, 9, 10, 11, 13, 14, 15], [16, 17, 18, 19]]
    assert out["word_ids"] == [[0, 1, 2, 2, 3, 4, 4, 4, 5, 6, 7], [0, 0, 0, 1]]
    assert out["sentence_ends"] == [[5, 11], [4]]
    assert out["is_eval"] == [False, False]


def test_document_encoder_runs_jieba_on_chinese_without_words(hand_tokenizer):
    out = DocumentEncoder(hand_tokenizer, "auto", 0.0)({"text": ["我爱北京天安门。"], "words": [None]})
    assert out["word_ids"] == [[0, 1, 2, 2, 3, 3, 3, 4]]  # jieba: 我 / 爱 / 北京 / 天安门 / 。
    none = DocumentEncoder(hand_tokenizer, "none", 0.0)({"text": ["我爱北京天安门。"]})
    assert none["word_ids"] == [[0, 1, 2, 3, 4, 5, 6, 7]]


def test_renumber():
    assert renumber([-1, 7, 7, 9, -1, 9, 9, 2, -1]) == [-1, 0, 0, 1, -1, 2, 2, 3, -1]


# ---------------------------------------------------------------------------------------------------------------
# examples


def doc(*sentence_lengths, first_id=100, first_word=0):
    """A document whose tokens are consecutive ids from first_id; each token a word of its own."""
    n = sum(sentence_lengths)
    return Document(
        list(range(first_id, first_id + n)), list(range(first_word, first_word + n)), list(np.cumsum(sentence_lengths))
    )


def test_truncate_pair_google_way():
    def ranges(*spans):
        return [(s.start, s.end) for s in spans]

    a, b = Span(0, 0, 6), Span(0, 10, 12)
    assert truncate_pair(a, b, 5, Scripted(0.9)) is True  # >= 0.5: from the back of the longer
    assert ranges(a, b) == [(0, 3), (10, 12)]
    a, b = Span(0, 0, 6), Span(0, 10, 14)
    assert truncate_pair(a, b, 6, Scripted(0.1)) is True  # < 0.5: from the front of the longer
    assert ranges(a, b) == [(3, 6), (11, 14)]
    assert truncate_pair(a, b, 6, Scripted(0.1)) is False


def test_nsp_positive_pairs_exact():
    cfg = DataConfig(max_seq_len=16, sentence_task="nsp", short_seq_prob=0.0)
    # sentences of 3, 4, 5, 6 tokens; budget 13: chunks [3, 4, 5] (12) and [6] left over
    examples, unused = document_pairs(0, doc(3, 4, 5, 6), cfg, SPECIAL, Scripted(0.9))
    assert unused == 1
    assert len(examples) == 1
    e = examples[0]
    assert e["input_ids"] == [2, 100, 101, 102, 3, *range(103, 112), 3]  # A = s1, B = s2 s3 (randint -> lowest)
    assert e["token_type_ids"] == [0] * 5 + [1] * 10
    assert e["word_ids"] == [-1, 0, 1, 2, -1, *range(3, 12), -1]
    assert (e["next_sentence_label"], e["truncated"]) == (0, False)


def test_nsp_negative_takes_whole_sentences_from_another_document():
    cfg = DataConfig(max_seq_len=16, sentence_task="nsp", short_seq_prob=0.0)
    other = doc(2, 3, 4, first_id=500)
    segments = RandomSegments([7], [3])  # document 7 offers its 2nd and 3rd sentences as starts
    examples, _ = document_pairs(0, doc(3, 4, 5), cfg, SPECIAL, Scripted(0.1), lambda i: other, segments)
    # random() < 0.5: B is random; it starts at the first slot (randrange -> 0): the other document's second
    # sentence, and takes whole sentences within 13 - 3 = 10 tokens: 3 + 4 = 7. A's unused sentences start
    # the next chunk.
    first = examples[0]
    assert first["input_ids"] == [2, 100, 101, 102, 3, 502, 503, 504, 505, 506, 507, 508, 3]
    assert first["next_sentence_label"] == 1
    assert first["token_type_ids"] == [0] * 5 + [1] * 8
    # the next chunk starts at s2 (put back), with s3 as its B, again random
    assert examples[1]["input_ids"][:6] == [2, 103, 104, 105, 106, 3]
    assert examples[1]["next_sentence_label"] == 1


def test_sop_swaps_a_and_b():
    cfg = DataConfig(max_seq_len=32, sentence_task="sop", short_seq_prob=0.0)
    in_order = document_pairs(0, doc(2, 3), cfg, SPECIAL, Scripted(0.9))[0]
    swapped = document_pairs(0, doc(2, 3), cfg, SPECIAL, Scripted(0.1))[0]
    assert [(e["input_ids"], e["next_sentence_label"]) for e in in_order] == [([2, 100, 101, 3, 102, 103, 104, 3], 0)]
    assert [(e["input_ids"], e["next_sentence_label"]) for e in swapped] == [([2, 102, 103, 104, 3, 100, 101, 3], 1)]
    assert swapped[0]["token_type_ids"] == [0, 0, 0, 0, 0, 1, 1, 1]


def test_random_segments_are_drawn_per_sentence():
    segments = RandomSegments([3, 8], [2, 5])  # starts: (3, 1) and (8, 1..4)
    rng = random.Random(0)
    draws = [segments.draw(rng, exclude=-1) for _ in range(5000)]
    assert set(draws) == {(3, 1), (8, 1), (8, 2), (8, 3), (8, 4)}
    assert abs(draws.count((3, 1)) / 5000 - 0.2) < 0.02
    assert all(d[0] == 8 for d in (segments.draw(rng, exclude=3) for _ in range(100)))
    assert RandomSegments([3], [2]).draw(rng, exclude=3) is None


def test_single_sentence_documents_give_no_pair():
    cfg = DataConfig(max_seq_len=32, sentence_task="nsp")
    assert document_pairs(0, doc(9), cfg, SPECIAL, random.Random(0)) == ([], 1)


def test_a_sentence_longer_than_max_seq_len_is_truncated():
    cfg = DataConfig(max_seq_len=16, sentence_task="sop", short_seq_prob=0.0)
    (example,), _ = document_pairs(0, doc(40, 3), cfg, SPECIAL, random.Random(1))
    assert len(example["input_ids"]) == 16
    assert example["truncated"] is True
    assert example["input_ids"].count(3) == 2


def test_none_packs_full_sentences_across_documents():
    cfg = DataConfig(max_seq_len=12, sentence_task="none")
    docs = [doc(3, 2, first_id=100), doc(4, first_id=200), doc(5, 30, first_id=300)]
    examples = pack_documents(docs, cfg, SPECIAL)
    assert [e["input_ids"] for e in examples] == [
        [2, 100, 101, 102, 103, 104, 3, 200, 201, 202, 203, 3],  # 3 + 2 + [SEP] + 4 = 10 = capacity
        [2, 300, 301, 302, 303, 304, 3],
        [2, *range(305, 315), 3],  # a 30-token sentence, cut to capacity and counted
    ]
    assert [e["truncated"] for e in examples] == [False, False, True]
    assert examples[0]["word_ids"] == [-1, 0, 1, 2, 3, 4, -1, 5, 6, 7, 8, -1]
    assert all(e["next_sentence_label"] == -100 and set(e["token_type_ids"]) == {0} for e in examples)


def synthetic_documents(n_docs=300, seed=0):
    """Documents whose token ids tell which document they come from: doc d uses ids 1000 d + ..."""
    import datasets

    rng = random.Random(seed)
    rows = {"input_ids": [], "word_ids": [], "sentence_ends": [], "is_eval": []}
    for d in range(n_docs):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 8))]
        n = sum(lengths)
        rows["input_ids"].append([1000 * d + 5 + t % 900 for t in range(n)])
        rows["word_ids"].append([t // 2 for t in range(n)])
        rows["sentence_ends"].append(list(np.cumsum(lengths)))
        rows["is_eval"].append(False)
    return datasets.Dataset.from_dict(rows)


@pytest.mark.parametrize("task", ["nsp", "sop", "none"])
def test_examples_fit_and_nsp_negatives_come_from_other_documents(task):
    documents = synthetic_documents()
    cfg = DataConfig(max_seq_len=64, sentence_task=task, short_seq_prob=0.2)
    builder = ExampleBuilder(documents, cfg, SPECIAL, epoch=0)
    examples = [e for g in range(2) for e in builder.group_examples(g)]
    assert len(examples) > 200
    for e in examples:
        ids = e["input_ids"]
        assert len(ids) <= 64
        assert ids[0] == SPECIAL.cls and ids[-1] == SPECIAL.sep
        if task == "none":
            continue
        sep = ids.index(SPECIAL.sep)
        docs_a = {t // 1000 for t in ids[1:sep]}
        docs_b = {t // 1000 for t in ids[sep + 1 : -1]}
        assert len(docs_a) == len(docs_b) == 1
        assert (docs_a != docs_b) == (task == "nsp" and e["next_sentence_label"] == 1)
    if task != "none":
        share = np.mean([e["next_sentence_label"] == 0 for e in examples])
        assert 0.4 < share < 0.6


def test_examples_are_redrawn_per_epoch_and_fixed_by_seed():
    documents = synthetic_documents(100)
    cfg = DataConfig(max_seq_len=64, sentence_task="nsp")

    def draw(epoch, c=cfg):
        return ExampleBuilder(documents, c, SPECIAL, epoch).group_examples(0)

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    assert draw(0) != draw(0, DataConfig(max_seq_len=64, sentence_task="nsp", seed=1))


# ---------------------------------------------------------------------------------------------------------------
# the embedded corpus end to end


@pytest.fixture(scope="module")
def embedded(zh_tokenizer_dir, tmp_path_factory):
    _, _, tok_dir = zh_tokenizer_dir
    cache = tmp_path_factory.mktemp("cache")
    tokenizer = load_tokenizer(tok_dir)

    def run(*overrides):
        cfg = load_config(PretrainConfig, "configs/pretrain/mini_zh.yaml", [f"data.cache_dir={cache}", *overrides])
        return prepare(cfg, tokenizer)

    return run


def edge_features(examples, tokenizer):
    """Per example: does each segment start / end at a sentence boundary? (What a lazy head would look at.)"""
    stops = set(tokenizer.convert_tokens_to_ids(list("。！？；…”」』）)》")))
    rows = []
    for e in examples:
        ids, sep = e["input_ids"], e["input_ids"].index(tokenizer.sep_token_id)
        first, second = ids[1:sep], ids[sep + 1 : -1]
        rows.append((first[-1] in stops, second[-1] in stops, bool(e["truncated"]), e["next_sentence_label"]))
    return rows


def edge_accuracy(rows):
    """Accuracy of the best classifier that sees only the edge features (the Bayes rule on their cells)."""
    cells = {}
    for *features, label in rows:
        cells.setdefault(tuple(features), [0, 0])[label] += 1
    return sum(max(c) for c in cells.values()) / len(rows)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_cls_label_cannot_be_read_off_segment_edges(embedded, task):
    prepared = embedded(f"data.sentence_task={task}")
    rows = edge_features(prepared.examples("train", 0), prepared.tokenizer)
    assert len(rows) > 20_000
    assert edge_accuracy(rows) < 0.54


@pytest.mark.slow  # 12-20 s: the control of the slow segment-edge probes above, run with them
def test_edge_detector_flags_a_leaky_builder(embedded):
    # Control: draw random B segments uniformly over documents (as Google's builder does) instead of over
    # sentences: short reviews then supply most of them, which end without a stop far more often than
    # true continuations do, and the detector must notice.
    prepared = embedded("data.sentence_task=nsp")
    builder = ExampleBuilder(prepared.documents["train"], prepared.data, prepared.special, epoch=0)
    counts = [len(ends) for ends in prepared.documents["train"]["sentence_ends"]]

    class PerDocument:  # Google's way: a random document, then a random sentence of it
        def draw(self, rng, exclude):
            doc = rng.randrange(len(counts))
            return (doc, rng.randrange(counts[doc])) if doc != exclude else None

    builder.segments = PerDocument()
    rows = edge_features([e for g in range(40) for e in builder.group_examples(g)], prepared.tokenizer)
    assert edge_accuracy(rows) > 0.58


def test_embedded_statistics(embedded):
    prepared = embedded()
    s = prepared.stats
    assert s["train_documents"] > 15_000 and s["validation_documents"] > 100  # articles and reviews
    assert s["single_sentence_documents"] > 5_000  # one-line reviews
    train = s["train_epoch0"]
    assert train["examples"] > 25_000
    assert 0.47 < train["positive_share"] < 0.53
    assert train["tokens"] / s["train_tokens"] > 0.95  # examples use nearly every token of the corpus
    assert 0.0 < train["padding_fraction"] < 0.3


@pytest.mark.slow
def test_cache_hit_and_miss(embedded, caplog):
    caplog.set_level("INFO")
    first = embedded()
    again = embedded()
    assert again.root == first.root
    assert "reusing tokenized documents" in caplog.text
    assert again.examples("train", 0)[:5] == first.examples("train", 0)[:5]
    longer = embedded("data.max_seq_len=256")
    assert longer.root == first.root and longer.examples_dir != first.examples_dir  # documents reused
    assert longer.examples("validation", 0).stats(256)["mean_length"] > 0
    other_segmenter = embedded("data.word_segmenter=none")
    assert other_segmenter.root != first.root


def test_cache_miss_when_a_corpus_file_changes(tmp_path, hand_tokenizer):
    corpus = tmp_path / "c.txt"
    corpus.write_text("我爱北京。天安门很大！\n")
    cfg = load_config(
        PretrainConfig,
        None,
        [f"corpus.sources=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=0"],
    )
    first = prepare_documents(cfg.corpus, cfg.data, hand_tokenizer)
    corpus.write_text("我爱北京。天安门很大！\n天安门很大！我爱北京。\n")
    second = prepare_documents(cfg.corpus, cfg.data, hand_tokenizer)
    assert first.root != second.root
    assert len(second.documents["train"]) == 2


def test_a_corpus_with_no_training_documents_is_refused_and_leaves_no_cache(tmp_path, hand_tokenizer):
    corpus = tmp_path / "c.txt"
    corpus.write_text("我爱北京。天安门很大！\n")
    cfg = load_config(
        PretrainConfig,
        None,
        [f"corpus.sources=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=1"],
    )
    with pytest.raises(BerthError, match="no training documents left"):
        prepare_documents(cfg.corpus, cfg.data, hand_tokenizer)
    (root,) = (tmp_path / "cache").iterdir()
    assert list(root.iterdir()) == []  # no documents, no statistics, no temporary directory


def test_preparation_leaves_only_the_documents_on_disk(tmp_path, hand_tokenizer, monkeypatch):
    """The text read, the chunked and the tokenized Arrow files are intermediate: none stays in datasets' cache or
    beside the documents, whose statistics are counted batch by batch."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("我爱北京。天安门很大！\n天安门很大！我爱北京。\n" * 3)
    cfg = load_config(
        PretrainConfig,
        None,
        [f"corpus.sources=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=0"],
    )
    prepared = prepare_documents(cfg.corpus, cfg.data, hand_tokenizer)
    assert sorted(p.name for p in prepared.root.iterdir()) == ["documents", "documents.json"]
    assert not list((tmp_path / "hf").rglob("*.arrow"))
    assert prepared.stats["train_documents"] == 6
    assert prepared.stats["train_tokens"] == sum(len(ids) for ids in prepared.documents["train"]["input_ids"])
    assert prepared.stats["single_sentence_documents"] == 0


def test_files_read_in_parallel_give_the_documents_of_one_reader(tmp_path, hand_tokenizer):
    """data.num_proc=2 reads a source's files in two processes, each its share: the same documents in the same
    order as one process reading them one after the other."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"part-{i}.txt").write_text(f"我爱北京{i}。天安门很大！\n天安门{i}很大！我爱北京。\n")
    documents = []
    for num_proc in (1, 2):
        cfg = load_config(
            PretrainConfig,
            None,
            [
                f"corpus.sources=[{corpus}]",
                f"data.cache_dir={tmp_path / f'cache-{num_proc}'}",
                "data.eval_fraction=0",
                f"data.num_proc={num_proc}",
            ],
        )
        documents.append(prepare_documents(cfg.corpus, cfg.data, hand_tokenizer).documents["train"]["input_ids"])
    assert len(documents[0]) == 10 and documents[0] == documents[1]


def test_same_examples_whatever_num_proc(embedded):
    one = embedded("data.num_proc=1", "data.seed=5").examples("validation", 3)
    two = embedded("data.num_proc=2", "data.seed=5").examples("validation", 3)
    assert [e["input_ids"] for e in one] == [e["input_ids"] for e in two]


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_tokenizer_without_mask_is_refused(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"]
    tok = build_wordpiece(WordPieceConfig(), vocab={t: i for i, t in enumerate(vocab)})
    from transformers import BertTokenizer

    hf = BertTokenizer(tokenizer_object=tok, mask_token=None)
    with pytest.raises(BerthError, match=r"the tokenizer has no \[MASK\] token"):
        check_tokenizer(hf)


def test_vocab_txt_that_does_not_match_is_refused(tmp_path, hand_tokenizer):
    hand_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n")
    with pytest.raises(BerthError, match=r"vocab.txt: 3 entries, but the tokenizer has 20"):
        check_tokenizer(load_tokenizer(tmp_path))


def test_max_seq_len_beyond_positions_is_refused():
    with pytest.raises(BerthError, match=r"data.max_seq_len=1024 is beyond the model's position embeddings \(512\)"):
        check_seq_len(1024, 512, "the model's position embeddings")


def test_bad_data_values_are_config_errors():
    with pytest.raises(BerthError, match="mask_prob must be in"):
        load_config(PretrainConfig, None, ["data.mask_prob=1.5"])
    with pytest.raises(BerthError, match="must be one of nsp, sop, none"):
        load_config(PretrainConfig, None, ["data.sentence_task=mlm"])


@pytest.mark.slow
def test_prepare_dump_writes_what_the_model_sees(zh_tokenizer_dir, tmp_path):
    _, _, tok_dir = zh_tokenizer_dir
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "berth",
            "-q",
            "prepare",
            "configs/pretrain/mini_zh.yaml",
            "--dump",
            "3",
            f"tokenizer.path={tok_dir}",
            f"data.cache_dir={tmp_path}",
            "corpus.sources=[peoples_daily_words]",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {
            "input_ids",
            "token_type_ids",
            "attention_mask",
            "labels",
            "word_ids",
            "next_sentence_label",
            "tokens",
            "original_tokens",
        }
        n = len(row["input_ids"])
        assert all(len(row[k]) == n for k in ("token_type_ids", "attention_mask", "labels", "word_ids", "tokens"))
        assert row["tokens"][0] == "[CLS]" and row["tokens"][-1] == "[SEP]"
        assert row["next_sentence_label"] in (0, 1)
        for label, original, shown in zip(row["labels"], row["original_tokens"], row["tokens"], strict=True):
            if label == -100:
                assert shown == original
        assert any(label != -100 for label in row["labels"])


def test_streamed_corpus_gives_the_same_documents(tmp_path, hand_tokenizer):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"我爱北京。天安门{'很' * (i % 5)}大！\n" for i in range(50)))
    common = [f"corpus.sources=[{corpus}]", "data.eval_fraction=0", "data.num_proc=1"]
    plain = load_config(PretrainConfig, None, [*common, f"data.cache_dir={tmp_path / 'a'}"])
    streamed = load_config(PretrainConfig, None, [*common, f"data.cache_dir={tmp_path / 'b'}", "corpus.streaming=true"])
    a = prepare_documents(plain.corpus, plain.data, hand_tokenizer).documents["train"]
    b = prepare_documents(streamed.corpus, streamed.data, hand_tokenizer).documents["train"]
    assert len(a) == 50
    assert a["input_ids"] == b["input_ids"] and a["word_ids"] == b["word_ids"]


def test_a_process_reads_the_tokens_of_its_own_examples_only(embedded, monkeypatch):
    """A process draws only the documents its micro-batches take examples from (nsp: each document's examples are
    drawn from it alone), and builds (reads the tokens of) only those examples; the processes together build
    exactly what one process builds, each example once."""
    from types import SimpleNamespace

    from berth.pretrain.masking import MaskingCollator
    from berth.pretrain.train import PretrainingStage

    prepared = embedded()
    built: list = []
    drawn: list = []
    recipes_drawn: list = []
    example, recipe_stream = ExampleBuilder.example, ExampleBuilder.recipe_stream

    def counted(self, d):
        drawn.append(d)
        for recipe in recipe_stream(self, d):
            recipes_drawn.append(recipe)
            yield recipe

    monkeypatch.setattr(ExampleBuilder, "example", lambda self, recipe: built.append(recipe) or example(self, recipe))
    monkeypatch.setattr(ExampleBuilder, "recipe_stream", counted)

    def build(processes, rank, steps=3, global_batch=24):
        cfg = load_config(
            PretrainConfig,
            "configs/pretrain/mini_zh.yaml",
            [f"train.batch_size={global_batch // processes // 2}", "train.grad_accum=2"],
        )
        stage = PretrainingStage(cfg)
        stage.prepared, stage.collective = prepared, None
        stage.collator = MaskingCollator(cfg.data, prepared.special)
        acc = SimpleNamespace(process_index=rank, num_processes=processes)
        built.clear()
        drawn.clear()
        recipes_drawn.clear()
        for k, _ in enumerate(stage.epoch_steps(0, 5, global_batch, acc)):
            if k + 1 == steps:
                break
        # a pair's first piece is from the document it was drawn from (a random B comes from another)
        assert sorted(drawn) == sorted({r.pieces[0][0] for r in built})  # each once, and no other
        # and each drawn only as far as the last of its recipes this process takes
        builder = stage.prepared.examples("train", 0).builder
        needed = {}
        for recipe in built:
            document = recipe.pieces[0][0]
            whole = list(recipe_stream(builder, document))  # the original: not counted
            needed[document] = max(needed.get(document, 0), whole.index(recipe) + 1)
        assert len(recipes_drawn) == sum(needed.values())
        return list(built)

    alone = build(1, 0)
    assert len(alone) == 3 * 24
    shares = [build(4, rank) for rank in range(4)]
    assert [len(share) for share in shares] == [3 * 6] * 4
    assert sorted(r for share in shares for r in share) == sorted(alone)


def test_documents_go_to_their_split_in_order_and_in_shards(tmp_path):
    import pyarrow as pa

    from berth.pretrain.shards import load_split, write_splits

    rows = synthetic_documents(300).map(
        lambda batch, idx: {"is_eval": [i % 3 == 0 for i in idx]},
        batched=True,
        with_indices=True,
        cache_file_name=str(tmp_path / "encoded.arrow"),
        writer_batch_size=50,
    )
    written = write_splits(rows, tmp_path / "out", "is_eval", ("train", "validation"), limit=20_000)
    assert written == {"train": 200, "validation": 100}
    train, validation = load_split(tmp_path / "out" / "train"), load_split(tmp_path / "out" / "validation")
    shards = sorted((tmp_path / "out" / "train").glob("*.arrow"))
    assert len(shards) > 2  # shards closed at the byte limit
    # each shard one record batch (this limit is below BATCH_BYTES), not the 50-row batches it was read in
    assert [len(list(pa.ipc.open_stream(pa.OSFile(str(shard))))) for shard in shards] == [1] * len(shards)
    assert list(train["input_ids"]) == [r for i, r in enumerate(rows["input_ids"]) if i % 3]
    assert list(validation["input_ids"]) == list(rows["input_ids"])[::3]
    assert train.features == rows.features
    no_eval = synthetic_documents(20).map(lambda b: b, batched=True, cache_file_name=str(tmp_path / "all.arrow"))
    write_splits(no_eval, tmp_path / "none", "is_eval", ("train", "validation"))
    assert (len(load_split(tmp_path / "none" / "train")), len(load_split(tmp_path / "none" / "validation"))) == (20, 0)
    with pytest.raises(RuntimeError, match="not a map result"):  # an in-memory dataset has no files to stream
        write_splits(synthetic_documents(5), tmp_path / "other", "is_eval", ("train", "validation"))


def test_a_falling_mask_rate_follows_the_optimizer_step_across_epochs_and_resumes(embedded, monkeypatch):
    """data.mask_prob_end: each step's batches are masked at the rate of its optimizer step, counted over the
    epochs (each drawn anew, so of its own length), the same when a run resumes mid-epoch; evaluation masks at the
    end rate."""
    from types import SimpleNamespace

    from berth.pretrain.masking import MaskingCollator
    from berth.pretrain.train import PretrainingStage

    prepared = embedded()
    global_batch = 2048  # a few steps an epoch
    cfg = load_config(
        PretrainConfig,
        "configs/pretrain/mini_zh.yaml",
        ["data.mask_prob=0.4", "data.mask_prob_end=0.1", "train.max_steps=20", f"train.batch_size={global_batch}"],
    )
    stage = PretrainingStage(cfg)
    stage.prepared, stage.collective = prepared, None
    rates: list = []
    call = MaskingCollator.__call__  # records each batch's rate, and masks two examples of it (quicker)
    monkeypatch.setattr(
        MaskingCollator,
        "__call__",
        lambda self, examples, rate=None: rates.append(rate) or call(self, examples[:2], rate),
    )
    stage.collator = MaskingCollator(cfg.data, prepared.special)
    acc = SimpleNamespace(process_index=0, num_processes=1)
    per_epoch = [len(prepared.examples("train", e)) // global_batch for e in range(2)]

    def epoch_rates(epoch, skip=0):
        rates.clear()
        list(stage.epoch_steps(epoch, skip, global_batch, acc))
        return list(rates)

    expected = [0.4 - 0.3 * min(s, 19) / 19 for s in range(per_epoch[0] + per_epoch[1])]  # held after step 19
    assert epoch_rates(0) == pytest.approx(expected[: per_epoch[0]])
    assert epoch_rates(1) == pytest.approx(expected[per_epoch[0] :])  # epoch 1 goes on from epoch 0's steps
    assert epoch_rates(1, skip=2) == pytest.approx(expected[per_epoch[0] + 2 :])  # a resumed run
    rates.clear()
    stage.collate([{**prepared.examples("validation", 0)[0], "mask_seed": 0}])
    assert rates == [0.1]


def test_the_mask_rate_of_a_step():
    falling = DataConfig(mask_prob=0.3, mask_prob_end=0.15)
    assert [falling.mask_rate(s, 4) for s in range(5)] == pytest.approx([0.3, 0.25, 0.2, 0.15, 0.15])
    assert (falling.final_mask_rate, DataConfig().final_mask_rate, DataConfig().mask_rate(3, 4)) == (0.15, 0.15, 0.15)
    with pytest.raises(ValueError, match="mask_prob_end must be in"):
        DataConfig(mask_prob_end=1.0)


def test_a_builder_goes_to_worker_processes_as_its_file_not_as_copies_of_the_tokens(tmp_path):
    import pickle

    documents = synthetic_documents(300).map(lambda b: b, batched=True, cache_file_name=str(tmp_path / "d.arrow"))
    builder = ExampleBuilder(documents, DataConfig(max_seq_len=64), SPECIAL, epoch=0)
    examples = builder.group_examples(0)  # the column views exist now
    tokens = sum(len(ids) for ids in documents["input_ids"])
    sent = pickle.dumps(builder)
    assert len(sent) < tokens  # the views would pickle as copies: 2 x 4 bytes a token
    assert pickle.loads(sent).group_examples(0) == examples
