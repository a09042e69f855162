"""`berth predict`: label texts of any length with a fine-tuned model, cut and aggregated as in training."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from berth.core.errors import BerthError
from berth.core.vocab import load_tokenizer
from berth.finetune.modeling import berth_settings, check_vocab, is_model_dir
from berth.finetune.registry import kind_of_architectures, task_kind
from berth.finetune.task import Loaded
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
        architectures = config.get("architectures") or []
        found = kind_of_architectures(architectures)
        if found is None:
            raise BerthError(
                f"{model_dir}: not a fine-tuned classifier (architectures: {' '.join(architectures) or 'none'}); "
                "fine-tune it first with berth finetune"
            )
        saved = berth_settings(path)
        self.settings = (
            WindowSettings(**saved)
            if saved
            else WindowSettings.for_checkpoint(found.name, config["max_position_embeddings"])
        )
        self.kind = task_kind(self.settings.task)
        hf_logging.disable_progress_bar()  # berth predict shows its own bar; standard error stays readable
        model = self.kind.auto_class.from_pretrained(str(path))
        check_vocab(self.tokenizer, model.config, str(model_dir))
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
        self.model = self.kind.predict_model(model, path, self.settings).to(self.accelerator.device).eval()
        self.loaded = Loaded(self.model, self.tokenizer, self.settings, self.labels, self.accelerator)

    @property
    def pairs(self) -> bool:
        return self.settings.text_pair

    def predict(self, texts: list[str], batch_size: int = 64, pairs: list[str] | None = None) -> list[dict[str, Any]]:
        if (pairs is not None) != self.pairs:
            raise BerthError("this model classifies text pairs" if self.pairs else "this model classifies single texts")
        return self.kind.predict(self.loaded, texts, pairs, batch_size)


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
