"""Batches for fine-tuning: length-grouped order and dynamic padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from berth.runtime.lockstep import EvalBatch, lockstep_batches


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True, chunk: int = 50
) -> list[list[int]]:
    """A shuffled epoch cut into batches; with group_by_length, texts of similar length share a batch.

    As transformers' LengthGroupedSampler: a random permutation is cut into chunks of `chunk` batches, each
    chunk sorted by length (longest first), cut into batches, and the batches shuffled. The order depends on
    (seed, epoch) only. The last batch may be smaller.
    """
    rng = np.random.default_rng([seed, epoch, 2])
    order = rng.permutation(len(lengths))
    if group_by_length:
        sizes = np.asarray(lengths)
        span = batch_size * chunk
        order = (
            np.concatenate(
                [
                    part[np.argsort(-sizes[part], kind="stable")]
                    for part in np.array_split(order, max(1, -(-len(order) // span)))
                ]
            )
            if len(order)
            else order
        )
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def pad_rows(rows: Sequence[Sequence[int]], value: int, multiple: int = 8) -> torch.Tensor:
    """[len(rows), L] with L the longest row rounded up to `multiple`, padded with `value`."""
    longest = max((len(r) for r in rows), default=0)
    width = -(-longest // multiple) * multiple if longest else 0
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def encoder_batch(
    input_ids: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    ids = pad_rows(input_ids, pad_id)  # [B, L]
    return {
        "input_ids": ids,
        "token_type_ids": pad_rows(token_type_ids, 0),
        "attention_mask": pad_rows([[1] * len(r) for r in input_ids], 0),
    }


def eval_order(lengths: Sequence[int], batch_size: int, rank: int = 0, processes: int = 1) -> list[EvalBatch]:
    """This process's share of the rows in batches of similar length (longest first), as many batches on every
    process (filler rows make up the difference; see `berth.runtime.lockstep`): evaluation is faster when padding
    is short, and the results are put back in row order afterwards."""
    return lockstep_batches(len(lengths), batch_size, rank, processes, lengths=lengths)


def gather_in_order(acc: Any, rows: list[tuple[int, Any]], total: int) -> list[Any]:
    """(row index, value) pairs computed by every process (their own rows from eval_order) -> the values in row
    order."""
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    if len(rows) != total:
        raise RuntimeError(f"evaluation gathered {len(rows)} rows of {total}")
    return [value for _, value in sorted(rows, key=lambda row: row[0])]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Dropout off inside, the model's own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
