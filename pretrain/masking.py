"""Masked-LM masking at collate time: a fresh mask every time an example is seen, reproducible and resumable.

Each example's mask comes from its own generator, seeded by (seed, epoch, example index). So the masks do
not depend on the batch size, the number of processes or data-loader workers, and resuming at any step
gives the masks an uninterrupted run would have used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
import torch

from berth.core.labels import IGNORE_INDEX
from berth.pretrain.config import DataConfig
from berth.pretrain.documents import NOT_A_WORD, SpecialIds

# 64-bit mixing constants (splitmix64) so that neighbouring (seed, epoch, index) give unrelated streams.
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def mask_seed(seed: int, epoch: int, index: int) -> int:
    z = (seed * _MIX[0] + epoch * _MIX[1] + index * _MIX[2]) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX[1]) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX[2]) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class EpochExamples(torch.utils.data.Dataset):
    """The examples of one epoch, each returned with the seed of its mask."""

    def __init__(self, examples: Any, seed: int, epoch: int):
        self.examples = examples
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.examples[int(index)], "mask_seed": mask_seed(self.seed, self.epoch, int(index))}


def sample_buckets(vocab_size: int) -> tuple[int, int]:
    """(buckets, bucket size) of the two-level sampling of replaced-token detection: about sqrt(V) each."""
    size = math.isqrt(vocab_size - 1) + 1
    return -(-vocab_size // size), size


def sample_draw_count(vocab_size: int) -> int:
    """Uniform draws per masked position for one sample from a vocabulary of `vocab_size`: one per bucket and
    one per token of a bucket (`berth.pretrain.rtd.sample_replacements`)."""
    return sum(sample_buckets(vocab_size))


def word_start_index(word_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L): for every position, the index of the first token of its word (run of equal ids)."""
    positions = torch.arange(word_ids.shape[1], device=word_ids.device).expand_as(word_ids)
    is_start = torch.ones_like(word_ids, dtype=torch.bool)
    is_start[:, 1:] = word_ids[:, 1:] != word_ids[:, :-1]
    return torch.where(is_start, positions, 0).cummax(dim=1).values


class MaskingCollator:
    """Pads a list of examples and masks them: BERT's 15% with 80/10/10, per word when whole_word_mask.

    Returns input_ids, token_type_ids, attention_mask (B, L); labels (B, L) with -100 where nothing is
    predicted; mlm_positions (N,) the flat indices of predicted tokens in (B * L) and mlm_labels (N,), so the
    model can run its MLM head on those N positions only; next_sentence_label (B,); word_ids (B, L).
    """

    def __init__(self, cfg: DataConfig, special: SpecialIds, mask: bool = True):
        self.cfg = cfg
        self.special = special
        self.mask = mask
        specials = torch.tensor(special.all)
        every_id = torch.arange(special.vocab_size)
        # Random replacements are ordinary tokens only: never [PAD], [CLS], [SEP], [MASK] or [UNK].
        self.replacement_ids = every_id[~torch.isin(every_id, specials)]

    def pad(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        multiple = self.cfg.pad_to_multiple_of
        batch = len(examples)
        lengths = np.fromiter((len(e["input_ids"]) for e in examples), dtype=np.int64, count=batch)
        length = -(-int(lengths.max()) // multiple) * multiple
        valid = np.arange(length) < lengths[:, None]  # (B, L) the examples' own tokens, left-aligned
        total = int(lengths.sum())

        def padded(key: str, fill: int) -> torch.Tensor:
            # One pass over the examples' lists; row-major assignment puts each example's tokens in its row.
            out = np.full((batch, length), fill, dtype=np.int64)
            out[valid] = np.fromiter(chain.from_iterable(e[key] for e in examples), dtype=np.int64, count=total)
            return torch.from_numpy(out)

        word_ids = padded("word_ids", NOT_A_WORD)
        if not self.cfg.whole_word_mask:
            # Every token a word of its own; specials and padding keep -1.
            word_ids = torch.where(word_ids >= 0, torch.arange(length).expand(batch, length), NOT_A_WORD)
        nsp = torch.tensor([int(e.get("next_sentence_label", IGNORE_INDEX)) for e in examples], dtype=torch.long)
        return {
            "input_ids": padded("input_ids", self.special.pad),
            "token_type_ids": padded("token_type_ids", 0),
            "attention_mask": torch.from_numpy(valid.astype(np.int64)),
            "word_ids": word_ids,
            "next_sentence_label": nsp,
        }

    def draws(self, examples: Sequence[dict[str, Any]], length: int) -> tuple[torch.Tensor, ...]:
        """Per-example uniform draws (choose, action) and random token ids, each (B, L).

        Each example draws for its own length only, so its mask does not depend on how long the other
        examples in the batch are. Padding positions get 1.0 (never chosen).
        """
        batch = len(examples)
        choose = torch.ones(batch, length)
        action = torch.ones(batch, length)
        tokens = torch.zeros(batch, length, dtype=torch.long)
        generator = torch.Generator()
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            generator.manual_seed(int(example["mask_seed"]))
            choose[row, :n] = torch.rand(n, generator=generator)
            action[row, :n] = torch.rand(n, generator=generator)
            tokens[row, :n] = torch.randint(len(self.replacement_ids), (n,), generator=generator)
        return choose, action, self.replacement_ids[tokens]

    def sample_draws(self, examples: Sequence[dict[str, Any]], chosen: torch.Tensor) -> torch.Tensor:
        """(N, K) uniform draws for the generator's samples at the chosen positions of (B, L) `chosen`, in their
        flat order: K = `sample_draw_count` per position, from a stream of the example's own (a second stream
        seeded from its mask seed, so masked LM's masks stay as they are)."""
        count = sample_draw_count(self.special.vocab_size)
        generator = torch.Generator()
        rows = []
        for row, example in enumerate(examples):
            generator.manual_seed(mask_seed(int(example["mask_seed"]), 1, 0))
            rows.append(torch.rand(int(chosen[row].sum()), count, generator=generator))
        return torch.cat(rows)

    def __call__(self, examples: Sequence[dict[str, Any]], mask_prob: float | None = None) -> dict[str, torch.Tensor]:
        """`mask_prob`: this batch's masking rate, in place of the config's (a rate that changes over the run)."""
        batch = self.pad(examples)
        input_ids, word_ids = batch["input_ids"], batch["word_ids"]
        if not self.mask:
            return batch
        choose, action, random_tokens = self.draws(examples, input_ids.shape[1])
        starts = word_start_index(word_ids)  # (B, L): one draw per word, read at the word's first token
        rate = self.cfg.mask_prob if mask_prob is None else mask_prob
        chosen = (choose.gather(1, starts) < rate) & (word_ids != NOT_A_WORD)
        act = action.gather(1, starts)
        p_mask, p_random = self.cfg.mask_replace_prob, self.cfg.random_replace_prob
        to_mask = chosen & (act < p_mask)
        to_random = chosen & (act >= p_mask) & (act < p_mask + p_random)
        labels = torch.where(chosen, input_ids, IGNORE_INDEX)
        masked = torch.where(to_mask, self.special.mask, input_ids)
        masked = torch.where(to_random, random_tokens, masked)
        positions = chosen.flatten().nonzero().squeeze(1)  # (N,) flat indices into (B * L)
        out = {
            **batch,
            "input_ids": masked,
            "labels": labels,
            "mlm_positions": positions,
            "mlm_labels": input_ids.flatten()[positions],
        }
        if self.cfg.objective == "rtd":
            out["mlm_draws"] = self.sample_draws(examples, chosen)  # (N, K)
        return out


def pack_batch(
    batch: dict[str, torch.Tensor], capacity: int, pad_id: int, multiple: int = 8
) -> dict[str, torch.Tensor]:
    """Pack a collated batch of B examples into R <= B rows of at most `capacity` tokens (first-fit decreasing).

    Examples keep their own positions (position_ids restart at 0) and see only themselves: `sequence_ids`
    (R, L) names each token's example (-1 for padding), from which the model builds a block-diagonal
    attention mask. Without it, sdpa would let packed examples attend to each other. `cls_positions` (B,)
    are the flat indices of each example's [CLS] in (R * L), in the order of `next_sentence_label`.
    """
    lengths = batch["attention_mask"].sum(1).tolist()
    fill: list[int] = []
    place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        place[i] = (row, fill[row])
        fill[row] += lengths[i]
    rows, length = len(fill), -(-max(fill) // multiple) * multiple
    out = {
        "input_ids": torch.full((rows, length), pad_id, dtype=torch.long),
        "token_type_ids": torch.zeros((rows, length), dtype=torch.long),
        "attention_mask": torch.zeros((rows, length), dtype=torch.long),
        "position_ids": torch.zeros((rows, length), dtype=torch.long),
        "sequence_ids": torch.full((rows, length), -1, dtype=torch.long),
        "word_ids": torch.full((rows, length), NOT_A_WORD, dtype=torch.long),
    }
    if "labels" in batch:
        out["labels"] = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    row_of = torch.tensor([row for row, _ in place], dtype=torch.long)  # (B,)
    start_of = torch.tensor([start for _, start in place], dtype=torch.long)  # (B,)
    # Every real token (example i, position j) moves to (row_of[i], start_of[i] + j), all at once.
    src_i, src_j = batch["attention_mask"].bool().nonzero(as_tuple=True)  # (T,) each
    dst_r, dst_c = row_of[src_i], start_of[src_i] + src_j
    for key in ("input_ids", "token_type_ids", "attention_mask", "word_ids", "labels"):
        if key in out:
            out[key][dst_r, dst_c] = batch[key][src_i, src_j]
    out["position_ids"][dst_r, dst_c] = src_j
    out["sequence_ids"][dst_r, dst_c] = src_i
    cls_positions = row_of * length + start_of
    out["cls_positions"] = cls_positions
    out["next_sentence_label"] = batch["next_sentence_label"]
    if "labels" in out:
        flat = out["labels"].flatten()
        out["mlm_positions"] = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        out["mlm_labels"] = flat[out["mlm_positions"]]
    if "mlm_draws" in batch:
        # each masked position's draws go with it: where it lands, in the packed rows' flat order
        width = batch["attention_mask"].shape[1]
        example, column = batch["mlm_positions"] // width, batch["mlm_positions"] % width
        landing = row_of[example] * length + start_of[example] + column  # (N,)
        out["mlm_draws"] = batch["mlm_draws"][landing.argsort()]
    return out
