"""Train a BERT WordPiece tokenizer with the `tokenizers` library and save it in Hugging Face format."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizer, PreTrainedTokenizerBase

from berth.core.config import dump_config, load_config, save_config
from berth.core.errors import BerthError
from berth.core.layout import CONFIG_FILENAME
from berth.core.vocab import has_tokenizer, load_tokenizer, write_vocab_txt
from berth.corpora.embedded import hash_unit
from berth.corpora.readers import load_corpus
from berth.tokenizer.config import TokenizerJobConfig, WordPieceConfig

logger = logging.getLogger(__name__)

# Fixed low ids, as in Google's BERT vocabularies apart from the order: [PAD] is 0 so that zero-filled
# buffers are padding, and every later stage can rely on these ids.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = SPECIAL_TOKENS
SUMMARY_FILENAME = "summary.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def build_wordpiece(cfg: WordPieceConfig, vocab: dict[str, int] | None = None) -> Tokenizer:
    """BERT's pipeline: BERT normalization, one token per CJK character, WordPiece with ##.

    Without `vocab` it is untrained (see train_wordpiece); with one it is ready to encode.
    """
    model = models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=cfg.max_input_chars_per_word)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=True,  # spaces around every CJK ideograph: one token per character
        strip_accents=cfg.strip_accents,
        lowercase=cfg.lowercase,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    if vocab is not None:
        _add_post_processor(tok)
    return tok


def _add_post_processor(tok: Tokenizer) -> None:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, tok.token_to_id(CLS)), (SEP, tok.token_to_id(SEP))],
    )


def corpus_alphabet(tok: Tokenizer, texts: Iterable[str], limit: int) -> tuple[list[str], list[str]]:
    """The `limit` most frequent characters of the texts (normalized and pre-tokenized as in training), ties
    broken by the character, and the ## pieces of those that continue a word (sorted).

    The tokenizers trainer is not deterministic (huggingface/tokenizers#1794): its own alphabet cut breaks ties
    among equally rare characters in hash-map order, and it numbers ## pieces in hash-map order as it meets
    them, and those numbers break ties between equally frequent merges. So berth fixes both beforehand.
    """
    counts: Counter[str] = Counter()
    continuing: set[str] = set()
    for text in texts:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            counts.update(word)
            continuing.update(word[1:])
    alphabet = sorted(counts, key=lambda c: (-counts[c], c))[:limit]
    return alphabet, [f"##{c}" for c in sorted(continuing.intersection(alphabet))]


class Passes:
    """An iterable that starts a fresh pass over a corpus each time it is iterated (a generator runs once)."""

    def __init__(self, start: Callable[[], Iterator[str]]):
        self.start = start

    def __iter__(self) -> Iterator[str]:
        return self.start()


def train_wordpiece(
    tok: Tokenizer, texts: Iterable[str], cfg: WordPieceConfig, length: int | None = None, progress: bool = True
) -> Tokenizer:
    """Train on `texts` (iterated twice: to count characters, then to train; a list or `Passes`) and return
    the tokenizer with its vocabulary in canonical order."""
    alphabet, pieces = corpus_alphabet(tok, texts, cfg.limit_alphabet)
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        # The ## pieces are numbered here, in a fixed order, before training. They are ordinary pieces of the
        # vocabulary, since the tokenizer is rebuilt from the trained vocabulary alone below.
        special_tokens=[*SPECIAL_TOKENS, *pieces],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),  # exactly these: they outrank every other character
        continuing_subword_prefix="##",
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise BerthError(f"special tokens got ids {ids}, expected 0..4; report this as a bug")
    if tok.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise BerthError("the trained vocabulary holds only special tokens: the corpus has no usable text")
    return build_wordpiece(cfg, canonical_vocab(tok.get_vocab()))


def canonical_vocab(vocab: dict[str, int]) -> dict[str, int]:
    """Special tokens first, then whole-word pieces and ## pieces, each sorted by the token.

    The trainer numbers pieces in hash-map order, so the same vocabulary would get other ids in another run,
    and with them another random embedding row per token. WordPiece matches the longest piece in the set,
    whatever the ids, so renumbering changes no tokenization.
    """
    rest = sorted((t for t in vocab if t not in SPECIAL_TOKENS), key=lambda t: (t.startswith("##"), t))
    return {token: i for i, token in enumerate([*SPECIAL_TOKENS, *rest])}


def to_transformers(tok: Tokenizer, cfg: WordPieceConfig) -> BertTokenizer:
    return BertTokenizer(
        tokenizer_object=tok,
        do_lower_case=cfg.lowercase,
        strip_accents=cfg.strip_accents,
        tokenize_chinese_chars=True,
        model_max_length=cfg.model_max_length,
        unk_token=UNK,
        sep_token=SEP,
        pad_token=PAD,
        cls_token=CLS,
        mask_token=MASK,
    )


def save_tokenizer(tok: Tokenizer, cfg: WordPieceConfig, output_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and vocab.txt.

    The files are written to a temporary directory first and moved in one by one, so a crash never leaves
    a half-written tokenizer.json next to the previous vocab.txt.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:
        hf = to_transformers(tok, cfg)
        hf.save_pretrained(tmp)
        write_vocab_txt(tok.get_vocab(), Path(tmp, "vocab.txt"))
        special = {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK}
        Path(tmp, "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
        for name in TOKENIZER_FILES:
            os.replace(Path(tmp, name), out / name)
    return out


def measure(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict[str, float]:
    """[UNK] rate (share of tokens) and tokens per character on `texts`, special tokens left out."""
    if not texts:
        return {"documents": 0, "characters": 0, "tokens": 0, "unk_rate": float("nan"), "tokens_per_char": float("nan")}
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    tokens = sum(len(ids) for ids in encoded)
    unks = sum(ids.count(tokenizer.unk_token_id) for ids in encoded)
    characters = sum(len(t) for t in texts)
    return {
        "documents": len(texts),
        "characters": characters,
        "tokens": tokens,
        "unk_rate": unks / max(tokens, 1),
        "tokens_per_char": tokens / max(characters, 1),
    }


def _split_heldout(corpus: Any, cfg: WordPieceConfig, heldout: list[str]) -> Iterator[str]:
    """Training texts; the held-out sample (chosen by a hash of the text) is appended to `heldout`."""
    batches = corpus.iter(batch_size=1000) if isinstance(corpus, datasets.Dataset) else _batched(corpus)
    for batch in batches:
        for text in batch["text"]:
            if hash_unit(text) < cfg.heldout_fraction:
                if len(heldout) < cfg.max_heldout_documents:
                    heldout.append(text)
                continue
            yield text


def _batched(corpus: Iterable[dict[str, Any]], size: int = 1000) -> Iterator[dict[str, list[Any]]]:
    texts: list[str] = []
    for row in corpus:
        texts.append(row["text"])
        if len(texts) == size:
            yield {"text": texts}
            texts = []
    if texts:
        yield {"text": texts}


def is_built(cfg: TokenizerJobConfig) -> bool:
    """True when output_dir holds a tokenizer trained with exactly this config."""
    out = Path(cfg.output_dir)
    saved = out / CONFIG_FILENAME
    if not all((out / name).is_file() for name in TOKENIZER_FILES) or not saved.is_file():
        return False
    return saved.read_text(encoding="utf-8") == dump_config(cfg)


def train_tokenizer(cfg: TokenizerJobConfig, reuse: bool = False, progress: bool = True) -> dict[str, Any]:
    """Read the corpus, train, save to cfg.output_dir and return the summary (also saved as summary.json)."""
    out = Path(cfg.output_dir)
    if reuse and is_built(cfg):
        logger.info("reusing the tokenizer in %s (built with the same config)", out)
        return json.loads((out / SUMMARY_FILENAME).read_text(encoding="utf-8"))
    start = time.perf_counter()
    corpus = load_corpus(cfg.corpus)
    length = corpus.num_rows if isinstance(corpus, datasets.Dataset) else None
    heldout: list[str] = []

    def one_pass() -> Iterator[str]:
        heldout.clear()  # each pass sets aside the same sample
        return _split_heldout(corpus, cfg.tokenizer, heldout)

    texts = Passes(one_pass)
    tok = train_wordpiece(build_wordpiece(cfg.tokenizer), texts, cfg.tokenizer, length=length, progress=progress)
    save_tokenizer(tok, cfg.tokenizer, out)
    elapsed = time.perf_counter() - start
    stats = measure(load_tokenizer(out), heldout)
    summary = {
        "output_dir": str(out),
        "vocab_size": tok.get_vocab_size(),
        "target_vocab_size": cfg.tokenizer.vocab_size,
        "train_seconds": round(elapsed, 2),
        "heldout": stats,
    }
    save_config(cfg, out)
    (out / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    held = summary["heldout"]
    return "\n".join(
        [
            f"tokenizer saved to {summary['output_dir']}",
            f"  vocab size       {summary['vocab_size']} (target {summary['target_vocab_size']})",
            f"  training time    {summary['train_seconds']:.1f} s",
            f"  held-out sample  {held['documents']} documents, {held['characters']} characters",
            f"  [UNK] rate       {held['unk_rate']:.4%} of tokens",
            f"  tokens per char  {held['tokens_per_char']:.3f}",
        ]
    )


def ensure_tokenizer(path: str | Path, config: str | Path | None) -> PreTrainedTokenizerBase:
    """The tokenizer in `path`; when there is none yet, train it first with the tokenizer config `config`."""
    path = Path(path)
    if not has_tokenizer(path):
        if not config:
            raise BerthError(f"{path}: no tokenizer here, and tokenizer.config is empty; run `berth tokenizer train`")
        logger.info("no tokenizer in %s yet: training it with %s", path, config)
        cfg = load_config(TokenizerJobConfig, config, [f"output_dir={path}"])
        logger.info("\n%s", format_summary(train_tokenizer(cfg)))
    return load_tokenizer(path)
