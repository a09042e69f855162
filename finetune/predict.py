"""`berth predict`: label texts of any length with a fine-tuned model, cut and aggregated as in training."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
from transformers.utils import logging as hf_logging

from berth.core.errors import BerthError
from berth.core.vocab import load_tokenizer
from berth.finetune.bio import bio_spans
from berth.finetune.classification import POOLERS, HierarchicalPooler, WindowClassifier, document_logits, encode_texts
from berth.finetune.export import POOLER_FILE
from berth.finetune.modeling import berth_settings, check_vocab, is_model_dir
from berth.finetune.ner import NerEncoded, add_windows, paragraph_from_word_ids, token_predictions, window_logits
from berth.finetune.windows import WindowSettings

# Texts per chunk: output is written chunk by chunk, in input order.
CHUNK = 256


PAIR_FIELD = "text_pair"


def read_texts(source: str, stdin: TextIO | None = None, pairs: bool = False) -> tuple[list[str], list[str] | None]:
    """One text a line, or JSON lines with a string `text` field (told by a .jsonl/.json suffix or a first line
    that is a JSON object); for a model of text pairs, JSON lines with `text` and `text_pair`. Returns the texts
    and the second texts (None for single texts). Every line is checked before any prediction is written."""
    if source == "-":
        name, stream = "<stdin>", stdin or sys.stdin
        try:
            # the bytes, decoded here: a non-UTF-8 byte is one line naming it, not a traceback
            text = stream.buffer.read().decode("utf-8") if hasattr(stream, "buffer") else stream.read()
        except UnicodeDecodeError as exc:
            raise BerthError(f"{name}: not UTF-8 text (byte {exc.start})") from None
        lines = text.splitlines()
    else:
        path = Path(source)
        if not path.is_file():
            raise BerthError(f"--input {source}: no such file")
        try:
            lines, name = path.read_text(encoding="utf-8").splitlines(), source
        except UnicodeDecodeError as exc:
            raise BerthError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    first = next((line for line in lines if line.strip()), "")
    as_json = name.endswith((".jsonl", ".json")) or first.lstrip().startswith("{")
    if pairs and not as_json and lines:
        raise BerthError(f"{name}: this model classifies text pairs; give JSON lines with 'text' and '{PAIR_FIELD}'")
    texts: list[str] = []
    seconds: list[str] = []
    for number, line in enumerate(lines, start=1):
        text = line
        if as_json:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BerthError(f"{name} line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise BerthError(f"{name} line {number}: expected a JSON object with a string 'text' field")
            text = row["text"]
            if pairs:
                second = row.get(PAIR_FIELD)
                if not isinstance(second, str) or not second.strip():
                    raise BerthError(
                        f"{name} line {number}: this model classifies text pairs; '{PAIR_FIELD}' must be a "
                        "non-empty string"
                    )
                seconds.append(second)
            elif PAIR_FIELD in row:
                raise BerthError(f"{name} line {number}: '{PAIR_FIELD}' given, but this model classifies single texts")
        if not text.strip():
            raise BerthError(f"{name} line {number}: empty text")
        texts.append(text)
    if not texts:
        raise BerthError(f"{name}: no texts to predict")
    return texts, (seconds if pairs else None)


class Predictor:
    """A fine-tuned model directory ready to label texts, with the window settings it was trained with."""

    def __init__(self, model_dir: str | Path, device: str | None = None):
        path = Path(model_dir)
        if not path.is_dir() or not is_model_dir(path):
            raise BerthError(f"{model_dir}: not a model directory (no config.json)")
        self.tokenizer = load_tokenizer(str(path))
        config = json.loads((path / "config.json").read_text())
        architectures = " ".join(config.get("architectures") or [])
        if "SequenceClassification" not in architectures and "TokenClassification" not in architectures:
            raise BerthError(
                f"{model_dir}: not a fine-tuned classifier (architectures: {architectures or 'none'}); "
                "fine-tune it first with berth finetune"
            )
        saved = berth_settings(path)
        task = "ner" if "TokenClassification" in architectures else "classification"
        self.settings = (
            WindowSettings(**saved) if saved else WindowSettings.for_checkpoint(task, config["max_position_embeddings"])
        )
        self.task = self.settings.task
        auto = AutoModelForTokenClassification if self.task == "ner" else AutoModelForSequenceClassification
        hf_logging.disable_progress_bar()  # berth predict shows its own bar; standard error stays readable
        model = auto.from_pretrained(str(path))
        check_vocab(self.tokenizer, model.config, str(model_dir))
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
        if self.task == "classification":
            pooling = self.settings.aggregation if self.settings.aggregation in POOLERS else ""
            weights = load_file(str(path / POOLER_FILE)) if pooling else {}
            model = WindowClassifier(model, pooling, HierarchicalPooler.layers_in(weights) or 1)
            if model.pooler is not None:
                model.pooler.load_state_dict(weights)
        self.model = model.to(self.accelerator.device).eval()

    @property
    def pairs(self) -> bool:
        return self.task == "classification" and self.settings.text_pair

    def predict(self, texts: list[str], batch_size: int = 64, pairs: list[str] | None = None) -> list[dict[str, Any]]:
        if self.task == "ner":
            return self._entities(texts, batch_size)
        if (pairs is not None) != self.pairs:
            raise BerthError("this model classifies text pairs" if self.pairs else "this model classifies single texts")
        encoded = encode_texts(self.tokenizer, texts, self.settings, pairs)
        how = self.settings.aggregation
        logits = document_logits(
            self.model, encoded, self.tokenizer.pad_token_id, self.accelerator, batch_size, (how,)
        )[how]
        score, label = torch.softmax(logits, dim=-1).max(dim=-1)
        return [{"label": self.labels[int(i)], "score": round(float(s), 6)} for i, s in zip(label, score, strict=True)]

    def _entities(self, texts: list[str], batch_size: int) -> list[dict[str, Any]]:
        batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        encoded = NerEncoded()
        for i in range(len(texts)):
            word_ids = batch.word_ids(i)
            num_words = max((w for w in word_ids if w is not None), default=-1) + 1
            paragraph = paragraph_from_word_ids(batch["input_ids"][i], word_ids, num_words, [-1] * num_words)
            cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
            add_windows(encoded, paragraph, cls, sep, self.settings.max_seq_len, self.settings.stride)
        logits = window_logits(self.model, encoded, self.tokenizer.pad_token_id, self.accelerator, batch_size)
        out = []
        for i, paragraph in enumerate(encoded.paragraphs):
            tags, probs = token_predictions(paragraph, [logits[w] for w in paragraph.windows])
            offsets = batch["offset_mapping"][i]
            starts, ends = word_offsets(paragraph.piece_word, offsets, len(paragraph.first_piece))
            entities = []
            for kind, first, last in bio_spans([self.labels[t] for t in tags]):
                start, end = starts[first], ends[last - 1]
                entities.append(
                    {
                        "type": kind,
                        "start": start,
                        "end": end,
                        "text": texts[i][start:end],
                        "score": round(float(np.mean(probs[first:last])), 6),
                    }
                )
            out.append({"entities": entities})
        return out


def word_offsets(piece_word: list[int], offsets: list[tuple[int, int]], num_words: int) -> tuple[list[int], list[int]]:
    """Character start and end of each word, from its pieces' offsets."""
    starts, ends = [0] * num_words, [0] * num_words
    seen = [False] * num_words
    for p, w in enumerate(piece_word):
        if w < 0:
            continue
        if not seen[w]:
            starts[w], seen[w] = offsets[p][0], True
        ends[w] = offsets[p][1]
    return starts, ends


def predict_file(
    model_dir: str,
    source: str,
    output: TextIO,
    batch_size: int = 64,
    progress: bool = True,
    stdin: TextIO | None = None,
) -> int:
    """Read texts from `source`, write one JSON line per text to `output` in order; returns the count."""
    if batch_size < 1:
        raise BerthError(f"--batch-size must be at least 1; got {batch_size}")
    predictor = Predictor(model_dir)
    texts, pairs = read_texts(source, stdin, predictor.pairs)
    bar = tqdm(total=len(texts), desc="predicting", unit="text", disable=not progress, file=sys.stderr)
    for start, stop in _chunks(len(texts), CHUNK):
        chunk_pairs = pairs[start:stop] if pairs is not None else None
        for row in predictor.predict(texts[start:stop], batch_size, chunk_pairs):
            output.write(json.dumps(row, ensure_ascii=False) + "\n")
        output.flush()
        bar.update(stop - start)
    bar.close()
    return len(texts)


def _chunks(count: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, count, size):
        yield start, min(start + size, count)
