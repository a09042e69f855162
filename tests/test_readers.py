import json
import time

import datasets
import pytest

from berth.core.errors import BerthError
from berth.corpora.config import CorpusConfig
from berth.corpora.readers import load_corpus


def texts(corpus):
    return [row["text"] for row in corpus]


def corpus_of(*sources, **kwargs):
    return load_corpus(CorpusConfig(sources=tuple(str(s) for s in sources), **kwargs))


def test_plain_text_one_document_a_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\ufefffirst doc\n\n  second doc  \r\nthird\n", encoding="utf-8")
    corpus = corpus_of(path)
    assert isinstance(corpus, datasets.Dataset)
    assert texts(corpus) == ["first doc", "second doc", "third"]


def test_plain_text_documents_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("p1 line1\np1 line2\n\n\n  \np2 line1\n", encoding="utf-8")
    assert texts(corpus_of(path, documents="blank_line")) == ["p1 line1\np1 line2", "p2 line1"]


def test_jsonl_csv_tsv_parquet_read_the_named_column(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"id": 1, "body": "json one"}) + "\n\n" + json.dumps({"id": 2, "body": "json two"}) + "\n"
    )
    (tmp_path / "b.csv").write_text('id,body\n1,"csv, one"\n2,\n3,csv three\n')
    (tmp_path / "c.tsv").write_text("id\tbody\n1\ttsv one\n")
    datasets.Dataset.from_dict({"id": [1, 2], "body": ["pq one", "pq two"]}).to_parquet(str(tmp_path / "d.parquet"))
    cfg = {"text_column": "body"}
    assert texts(corpus_of(tmp_path / "a.jsonl", **cfg)) == ["json one", "json two"]
    assert texts(corpus_of(tmp_path / "b.csv", **cfg)) == ["csv, one", "csv three"]
    assert texts(corpus_of(tmp_path / "c.tsv", **cfg)) == ["tsv one"]
    assert texts(corpus_of(tmp_path / "d.parquet", **cfg)) == ["pq one", "pq two"]
    both = corpus_of(tmp_path / "a.jsonl", tmp_path / "d.parquet", **cfg)
    assert texts(both) == ["json one", "json two", "pq one", "pq two"]


def test_glob_and_directory_read_every_file_in_order(tmp_path):
    for i in range(3):
        (tmp_path / "shards").mkdir(exist_ok=True)
        (tmp_path / "shards" / f"part-{i}.txt").write_text(f"doc {i}a\ndoc {i}b\n")
    expected = ["doc 0a", "doc 0b", "doc 1a", "doc 1b", "doc 2a", "doc 2b"]
    assert texts(corpus_of(tmp_path / "shards" / "part-*.txt")) == expected
    assert texts(corpus_of(tmp_path / "shards")) == expected


def test_streaming_yields_the_same_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("".join(f"line {i}\n" for i in range(50)))
    streamed = corpus_of(path, streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert texts(streamed) == texts(corpus_of(path))


def test_changed_file_is_read_again_not_served_from_cache(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old text\n")
    assert texts(corpus_of(path)) == ["old text"]
    path.write_text("new text, longer\n")
    assert texts(corpus_of(path)) == ["new text, longer"]


def test_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(BerthError, match=r"corpus source '.*nope\.txt': no such file, directory or glob match"):
        corpus_of(tmp_path / "nope.txt")


def test_empty_corpus(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n   \n\n")
    with pytest.raises(BerthError, match="the corpus is empty"):
        corpus_of(path)
    with pytest.raises(BerthError, match="the corpus is empty"):
        corpus_of(path, streaming=True)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\n" + b"bad \xff line\n" + b"after\n")
    with pytest.raises(BerthError) as err:
        corpus_of(path)
    assert str(err.value).startswith(f"{path}:2: not valid UTF-8 (byte 0xff at column 5)")


def test_invalid_utf8_skipped_and_counted_when_asked(tmp_path, caplog):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good\n\xc3\x28 broken\nalso good\n\xa0\n")
    assert texts(corpus_of(path, on_decode_error="skip")) == ["good", "also good"]
    assert "skipped 2 line(s) that are not valid UTF-8" in caplog.text


def test_invalid_utf8_in_csv_is_reported_before_pandas_sees_it(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text\nfine\n\xfe\xfe\n")
    with pytest.raises(BerthError, match=r"bad\.csv:3: not valid UTF-8"):
        corpus_of(path)


def test_missing_column_names_the_file_and_the_columns(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "b.csv").write_text("id,body\n1,x\n")
    with pytest.raises(BerthError, match=r"a\.jsonl:1: no 'text' field \(fields: body\); set corpus.text_column"):
        corpus_of(tmp_path / "a.jsonl")
    with pytest.raises(BerthError, match=r"b\.csv: no column 'text' \(columns: id, body\); set corpus.text_column"):
        corpus_of(tmp_path / "b.csv")


def test_bad_json_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(BerthError, match=r"a\.jsonl:2: not valid JSON"):
        corpus_of(path)


def test_unknown_suffix_asks_for_the_format(tmp_path):
    path = tmp_path / "a.dat"
    path.write_text("x\n")
    with pytest.raises(BerthError, match=r"cannot tell the format from the suffix '\.dat'; set corpus.format"):
        corpus_of(path)
    assert texts(corpus_of(path, format="text")) == ["x"]


def test_hub_dataset_fails_at_once_when_offline():
    start = time.perf_counter()
    with pytest.raises(BerthError, match=r"corpus source 'hf:someone/corpus' needs the Hugging Face Hub"):
        corpus_of("hf:someone/corpus")
    assert time.perf_counter() - start < 2.0


def test_exclude_removes_the_texts_of_other_sources(tmp_path):
    (tmp_path / "all.txt").write_text("keep me\nheld out\nkeep too\n")
    (tmp_path / "test.txt").write_text("held out\n")
    corpus = corpus_of(tmp_path / "all.txt", exclude=(str(tmp_path / "test.txt"),))
    assert texts(corpus) == ["keep me", "keep too"]


def test_reviews_named_corpus_holds_training_texts_only():
    train = set(texts(corpus_of("reviews_sentiment")))
    held_out = set(texts(corpus_of("reviews_sentiment:validation"))) | set(texts(corpus_of("reviews_sentiment:test")))
    assert len(train) > 10_000
    assert not train & held_out


def test_word_column_kept_only_when_every_source_has_it():
    words = corpus_of("peoples_daily_words")
    assert words.column_names == ["text", "words"]
    assert "".join(words[1]["words"]) == "".join(words[1]["text"].split())
    assert corpus_of("peoples_daily_words", "reviews_sentiment").column_names == ["text"]
