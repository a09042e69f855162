import random

import pytest
import torch

from berth.core.vocab import load_tokenizer
from berth.pretrain.config import DataConfig
from berth.pretrain.data import Document, pack_documents, renumber
from berth.pretrain.documents import DocumentEncoder, SpecialIds
from berth.pretrain.masking import EpochExamples, MaskingCollator, mask_seed, word_start_index

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, vocab_size=500)


def random_examples(n, seed=0, word_len=1, max_len=128):
    """Pair-shaped examples with random ordinary tokens; words of `word_len` tokens (or random 1-4 when 0)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(20, max_len - 3)
        cut = rng.randint(1, length - 1)
        ids = [rng.randrange(5, SPECIAL.vocab_size) for _ in range(length)]
        words, w, left = [], -1, 0
        for _ in range(length):
            if left == 0:
                w, left = w + 1, word_len or rng.randint(1, 4)
            words.append(w)
            left -= 1
        a_words, b_words = words[:cut], [x + 10_000 for x in words[cut:]]
        out.append(
            {
                "input_ids": [2, *ids[:cut], 3, *ids[cut:], 3],
                "token_type_ids": [0] * (cut + 2) + [1] * (length - cut + 1),
                "word_ids": renumber([-1, *a_words, -1, *b_words, -1]),
                "next_sentence_label": i % 2,
                "mask_seed": mask_seed(0, 0, i),
            }
        )
    return out


def collate_all(examples, cfg, batch_size=32):
    collator = MaskingCollator(cfg, SPECIAL)
    return [collator(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def shares(batches, examples_flat_original=None):
    chosen = masked = replaced = kept = candidates = 0
    for b in batches:
        labels = b["labels"]
        is_candidate = b["word_ids"] >= 0
        sel = labels != -100
        candidates += int(is_candidate.sum())
        chosen += int(sel.sum())
        masked += int((sel & (b["input_ids"] == SPECIAL.mask)).sum())
        kept += int((sel & (b["input_ids"] == labels)).sum())
        replaced += int((sel & (b["input_ids"] != SPECIAL.mask) & (b["input_ids"] != labels)).sum())
    return candidates, chosen / candidates, masked / chosen, replaced / chosen, kept / chosen


@pytest.mark.parametrize("whole_word", [False, True])
def test_fifteen_percent_with_80_10_10(whole_word):
    examples = random_examples(1600, word_len=0)
    cfg = DataConfig(whole_word_mask=whole_word)
    candidates, chosen, masked, replaced, kept = shares(collate_all(examples, cfg))
    assert candidates > 100_000
    assert abs(chosen - 0.15) < 0.005
    assert abs(masked - 0.80) < 0.01
    # a random replacement equals the original 1 time in 495; the bounds absorb that
    assert abs(replaced - 0.10) < 0.01
    assert abs(kept - 0.10) < 0.01


def test_mask_prob_is_one_override_away():
    cfg = DataConfig(mask_prob=0.3, mask_replace_prob=1.0, random_replace_prob=0.0)
    _, chosen, masked, replaced, _ = shares(collate_all(random_examples(1600), cfg))
    assert abs(chosen - 0.30) < 0.005
    assert masked == 1.0 and replaced == 0.0


def test_special_tokens_and_padding_are_never_chosen():
    batches = collate_all(random_examples(400), DataConfig(mask_prob=0.9))
    for b in batches:
        special = b["word_ids"] < 0
        assert (b["labels"][special] == -100).all()
        original_special = torch.isin(b["input_ids"], torch.tensor([0, 2, 3])) & special
        assert (original_special == special).all()  # specials and padding come through unchanged
        chosen = b["labels"] != -100
        random_tokens = chosen & (b["input_ids"] != SPECIAL.mask) & (b["input_ids"] != b["labels"])
        assert (b["input_ids"][random_tokens] >= 5).all()  # replacements are never special tokens


def test_whole_words_are_masked_or_kept_entirely():
    batches = collate_all(random_examples(600, word_len=0), DataConfig(whole_word_mask=True, mask_prob=0.3))
    words_seen = 0
    for b in batches:
        for row in range(b["input_ids"].shape[0]):
            words = b["word_ids"][row]
            for w in words.unique():
                if w < 0:
                    continue
                at = words == w
                chosen = b["labels"][row][at] != -100
                assert chosen.all() or not chosen.any()
                if chosen.any():
                    is_mask = b["input_ids"][row][at] == SPECIAL.mask
                    assert is_mask.all() or not is_mask.any()  # 80/10/10 drawn once per word
                words_seen += 1
    assert words_seen > 10_000


def test_chinese_whole_words_from_the_corpus_segmentation(zh_tokenizer_dir):
    _, _, tok_dir = zh_tokenizer_dir
    tokenizer = load_tokenizer(tok_dir)
    encode = DocumentEncoder(tokenizer, "auto", 0.0)
    out = encode(
        {
            "text": ["中共中央总书记、国家主席江泽民。"],
            "words": [["中共中央", "总书记", "、", "国家", "主席", "江", "泽民", "。"]],
        }
    )
    assert out["word_ids"] == [[0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 5, 6, 6, 7]]
    special = SpecialIds(0, 1, 2, 3, 4, len(tokenizer))
    examples = pack_documents(
        [Document(out["input_ids"][0], out["word_ids"][0], out["sentence_ends"][0])],
        DataConfig(max_seq_len=32, sentence_task="none"),
        special,
    )
    collator = MaskingCollator(DataConfig(mask_prob=0.5), special)
    for seed in range(200):
        b = collator([{**examples[0], "mask_seed": seed}])
        chosen = (b["labels"][0] != -100)[1:17].tolist()
        for start, end in [(0, 4), (4, 7), (8, 10), (10, 12), (13, 15)]:  # 中共中央 总书记 国家 主席 泽民
            assert len(set(chosen[start:end])) == 1


def test_english_whole_words_from_wordpiece_pieces():
    # un ##aff ##able | runs: word ids from the ## rule
    example = {
        "input_ids": [2, 20, 21, 22, 23, 3],
        "token_type_ids": [0] * 6,
        "word_ids": [-1, 0, 0, 0, 1, -1],
        "next_sentence_label": -100,
    }
    collator = MaskingCollator(DataConfig(mask_prob=0.5), SPECIAL)
    patterns = set()
    for seed in range(100):
        chosen = (collator([{**example, "mask_seed": seed}])["labels"][0] != -100).tolist()
        assert chosen[1] == chosen[2] == chosen[3]
        patterns.add(tuple(chosen))
    assert len(patterns) == 4  # each of the two words chosen or not, independently


def test_padding_exact():
    collator = MaskingCollator(DataConfig(pad_to_multiple_of=8), SPECIAL, mask=False)
    batch = collator(
        [
            {
                "input_ids": [2, 10, 3, 11, 3],
                "token_type_ids": [0, 0, 0, 1, 1],
                "word_ids": [-1, 0, -1, 1, -1],
                "next_sentence_label": 1,
            },
            {
                "input_ids": [2, 12, 13, 3],
                "token_type_ids": [0, 0, 0, 0],
                "word_ids": [-1, 0, 0, -1],
                "next_sentence_label": -100,
            },
        ]
    )
    assert batch["input_ids"].tolist() == [[2, 10, 3, 11, 3, 0, 0, 0], [2, 12, 13, 3, 0, 0, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0], [0] * 8]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert batch["word_ids"].tolist() == [[-1, 0, -1, 1, -1, -1, -1, -1], [-1, 0, 0, -1, -1, -1, -1, -1]]
    assert batch["next_sentence_label"].tolist() == [1, -100]
    assert "labels" not in batch


def test_masked_positions_match_labels():
    b = collate_all(random_examples(64), DataConfig())[0]
    flat = b["labels"].flatten()
    assert torch.equal(b["mlm_positions"], (flat != -100).nonzero().squeeze(1))
    assert torch.equal(b["mlm_labels"], flat[b["mlm_positions"]])


def test_same_seed_same_batches_and_masks_independent_of_batching():
    examples = random_examples(64)
    cfg = DataConfig()
    first, again = collate_all(examples, cfg, 32), collate_all(examples, cfg, 32)
    for x, y in zip(first, again, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # each example's mask is its own: batches of 8 give the same rows as batches of 32
    small = collate_all(examples, cfg, 8)
    big_rows = [row for b in first for row in b["labels"]]
    small_rows = [
        (row, int(mask.sum())) for b in small for row, mask in zip(b["labels"], b["attention_mask"], strict=True)
    ]
    assert len(small_rows) == len(big_rows) == 64
    assert any(len(row) != len(big) for (row, _), big in zip(small_rows, big_rows, strict=True))
    for (row, n), big in zip(small_rows, big_rows, strict=True):
        assert torch.equal(row[:n], big[:n])


def test_a_fresh_mask_each_epoch():
    data = [{k: v for k, v in e.items() if k != "mask_seed"} for e in random_examples(8)]
    collator = MaskingCollator(DataConfig(), SPECIAL)
    epoch0 = collator([EpochExamples(data, seed=0, epoch=0)[i] for i in range(8)])
    epoch0_again = collator([EpochExamples(data, seed=0, epoch=0)[i] for i in range(8)])
    epoch1 = collator([EpochExamples(data, seed=0, epoch=1)[i] for i in range(8)])
    assert torch.equal(epoch0["labels"], epoch0_again["labels"])
    assert not torch.equal(epoch0["labels"], epoch1["labels"])


def test_word_starts():
    words = torch.tensor([[-1, 0, 0, 1, 1, 1, -1, 2, -1, -1]])
    assert word_start_index(words).tolist() == [[0, 1, 1, 3, 3, 3, 6, 7, 8, 8]]
