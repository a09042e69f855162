"""Real texts hidden in unrelated real text: the documents of the robustness evaluation and of hidden-text training.

Each document is one text placed at the start, in the middle or at the end of paragraphs from another source,
filled to between 3 and 8 windows (`build_documents`). `text_windows` says where the hidden text lies in each of
the document's windows. The paragraphs come from People's Daily or from a file of one paragraph a line:
`distractor_paragraphs` (evaluation: People's Daily's test share, which the demo's pretraining never reads) and
`outlier_paragraphs` (training: its train share), so nothing trained on is evaluated on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from berth.core.errors import BerthError
from berth.core.text import vocabulary_languages
from berth.corpora.embedded import peoples_daily
from berth.finetune.windows import Encoded, WindowSettings, window_spans

POSITIONS = ("start", "middle", "end")
WINDOWS = (3, 8)  # the documents' lengths, in windows, drawn uniformly between these two
MIN_PARAGRAPH_CHARS = 20  # headlines and bylines are no paragraphs to hide a verdict among


@dataclass
class HiddenSet:
    """The documents (the text of `source[d]` at `positions[d]`), their labels, and the texts alone."""

    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    positions: list[str] = field(default_factory=list)
    source: list[int] = field(default_factory=list)  # index of the test text in the split
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) characters of the text in texts[d]
    alone: list[str] = field(default_factory=list)  # the test texts used, in order
    alone_labels: list[int] = field(default_factory=list)

    def extend(self, other: HiddenSet, indices: list[int]) -> None:
        """Append `other`, built from a subset of the texts: indices[i] is the number of its text i in the whole."""
        self.texts += other.texts
        self.labels += other.labels
        self.positions += other.positions
        self.source += [indices[i] for i in other.source]
        self.spans += other.spans
        self.alone += other.alone
        self.alone_labels += other.alone_labels


def distractor_paragraphs(setting: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], str]:
    """(paragraphs, their source's name); no paragraphs when the setting is empty, or auto with a tokenizer
    that does not cover Chinese (the embedded People's Daily)."""
    if not setting:
        return [], ""
    if setting == "auto":
        # the test share of its paragraphs: the demo pretrains on the train share, so these were never read
        paragraphs = peoples_daily_paragraphs(tokenizer, "test")
        return paragraphs, "peoples_daily" if paragraphs else ""
    return read_paragraphs(setting, "data.distractors")


def outlier_paragraphs(setting: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], str]:
    """Unrelated text to train on (outlier exposure): auto takes People's Daily's train share, never the test share
    the robustness evaluation hides texts in; or a UTF-8 file, one paragraph a line."""
    if setting == "auto":
        paragraphs = peoples_daily_paragraphs(tokenizer, "train")
        return paragraphs, "peoples_daily (train share)" if paragraphs else ""
    return read_paragraphs(setting, "data.outlier_text")


def peoples_daily_paragraphs(tokenizer: PreTrainedTokenizerBase, split: str) -> list[str]:
    """People's Daily paragraphs of one share, headlines left out; none for a tokenizer that does not cover Chinese."""
    if "zh" not in vocabulary_languages(tokenizer.get_vocab()):
        return []
    texts = peoples_daily(unit="paragraph", split=split)["text"]
    return [t for t in texts if len(t) >= MIN_PARAGRAPH_CHARS]


def read_paragraphs(setting: str, key: str) -> tuple[list[str], str]:
    path = Path(setting)
    if not path.is_file():
        raise BerthError(f"{key}={setting}: no such file (one paragraph a line, or auto)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise BerthError(f"{key}={setting}: not UTF-8 text (byte {exc.start})") from None
    paragraphs = [line.strip() for line in lines if len(line.strip()) >= MIN_PARAGRAPH_CHARS]
    if not paragraphs:
        raise BerthError(f"{key}={setting}: no paragraph of {MIN_PARAGRAPH_CHARS} characters or more")
    return paragraphs, str(path)


def build_documents(
    texts: list[str],
    labels: list[int],
    paragraphs: list[str],
    tokenizer: PreTrainedTokenizerBase,
    settings: WindowSettings,
    count: int,
    seed: int,
    every_position: bool = True,
) -> HiddenSet:
    """Up to `count` test texts (a seeded draw among those shorter than the shortest document), each hidden at
    every position among consecutive distractor paragraphs from a seeded start, to a length of 3-8 windows;
    with every_position=False (training documents), at one position drawn per text."""
    rng = np.random.default_rng([seed, 15])
    # its own stream, so that the documents of every_position=True stay the same draw
    placement = np.random.default_rng([seed, 16])
    room = settings.max_seq_len - 2  # content tokens of one window
    sizes: dict[int, int] = {}

    def tokens(i: int) -> int:
        if i not in sizes:
            sizes[i] = len(tokenizer(paragraphs[i], add_special_tokens=False, verbose=False)["input_ids"])
        return sizes[i]

    out = HiddenSet()
    for index in rng.permutation(len(texts)).tolist():
        if len(out.alone) == count:
            break
        windows = int(rng.integers(WINDOWS[0], WINDOWS[1] + 1))
        # n windows cover room + (n - 2) x stride + 1 to room + (n - 1) x stride tokens: aim inside, half a stride
        # from the edge, so the few tokens the joins may add or take leave n windows
        target = room + (windows - 1) * settings.stride - int(rng.integers(0, max(settings.stride // 2, 1)))
        own = len(tokenizer(texts[index], add_special_tokens=False, verbose=False)["input_ids"])
        if own >= room:
            continue  # a text of a window or more would not be hidden: it is the document
        filler, total, at = [], own, int(rng.integers(len(paragraphs)))
        while total < target:
            paragraph = paragraphs[at % len(paragraphs)]
            size = tokens(at % len(paragraphs))
            if total + size > target:  # the last paragraph cut at the token that reaches the length
                spans = tokenizer(paragraph, add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
                    "offset_mapping"
                ]
                paragraph, size = paragraph[: spans[target - total - 1][1]], target - total
            filler.append(paragraph)
            total += size
            at += 1
        before, after = halves("\n".join(filler))
        placed = {
            "start": [texts[index], before + after],
            "middle": [before, texts[index], after],
            "end": [before + after, texts[index]],
        }
        for position in POSITIONS if every_position else [POSITIONS[int(placement.integers(len(POSITIONS)))]]:
            at_text = {"start": 0, "middle": 1, "end": len(placed[position]) - 1}[position]
            preceding = [part for part in placed[position][:at_text] if part]
            start = sum(len(part) + 1 for part in preceding)  # each followed by its "\n"
            out.texts.append("\n".join(part for part in placed[position] if part))
            out.spans.append((start, start + len(texts[index])))
            out.labels.append(labels[index])
            out.positions.append(position)
            out.source.append(index)
        out.alone.append(texts[index])
        out.alone_labels.append(labels[index])
    return out


@dataclass
class TextWindows:
    """One document of a HiddenSet as encode_texts cuts it: its content token ids, each window's [start, end)
    token span, how many tokens of the hidden text each window holds, and the hidden text's token count."""

    ids: list[int]
    spans: list[tuple[int, int]]
    held: list[int]
    own: int


def text_windows(tokenizer: PreTrainedTokenizerBase, docs: HiddenSet, settings: WindowSettings) -> list[TextWindows]:
    """Where the hidden text lies in each document's windows (hidden-text training labels windows by it; the
    robustness evaluation scores the text's windows without the others)."""
    pieces = tokenizer(docs.texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    out = []
    for (first, last), ids, offsets in zip(docs.spans, pieces["input_ids"], pieces["offset_mapping"], strict=True):
        inside = np.array([first <= a and b <= last for a, b in offsets], dtype=bool)  # [T]: a token of the text
        spans = window_spans(len(ids), settings.max_seq_len - 2, settings.stride)
        out.append(TextWindows(ids, spans, [int(inside[a:b].sum()) for a, b in spans], int(inside.sum())))
    return out


def halves(text: str) -> tuple[str, str]:
    """`text` cut in two at the paragraph, sentence or clause end nearest its middle (at the middle when it has
    none): the hidden text sits between whole clauses."""
    ends = [i + 1 for i, char in enumerate(text) if char in "\n。！？；，!?;,"]
    cut = min(ends, key=lambda i: abs(i - len(text) / 2)) if ends else len(text) // 2
    return text[:cut].rstrip("\n"), text[cut:].lstrip("\n")


def encode_hidden(
    tokenizer: PreTrainedTokenizerBase, docs: HiddenSet, settings: WindowSettings
) -> tuple[Encoded, list[TextWindows]]:
    """A HiddenSet's documents cut as encode_texts cuts them, and where the hidden text lies in each window,
    from one tokenization."""
    found = text_windows(tokenizer, docs, settings)
    encoded = Encoded()
    for label, doc in zip(docs.labels, found, strict=True):
        cuts = [doc.ids[start:end] for start, end in doc.spans]
        encoded.add_cuts(label, len(doc.ids), cuts, tokenizer.cls_token_id, tokenizer.sep_token_id)
    return encoded, found
