"""Evaluation shares that keep every process in step.

Under FSDP2 and DeepSpeed ZeRO-3 every forward pass is a collective (each layer gathers its weights from all
processes), so every process must run the same number of forward passes, or the collectives pair up wrongly: gloo
fails with "Received data size doesn't match expected size", NCCL hangs. A split that does not divide evenly, or
has fewer rows than there are processes, leaves some processes with fewer batches; they run filler batches of one
row instead, whose outputs are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EvalBatch:
    """Row indices to run together; only the first `own` are this process's share (the rest is filler)."""

    rows: list[int]
    own: int

    @property
    def mine(self) -> list[int]:
        return self.rows[: self.own]


def lockstep_batches(
    count: int,
    batch_size: int,
    rank: int = 0,
    processes: int = 1,
    lengths: Sequence[int] | None = None,
    limit: int = 0,
) -> list[EvalBatch]:
    """Process `rank`'s share of rows 0..count-1 (every `processes`-th row) in batches of `batch_size`, padded with
    filler batches to the number the largest share needs, so every process runs as many batches as any other.

    With `lengths`, the share is ordered longest first (short padding within a batch) and the filler row is the
    shortest row of the split (the cheapest forward). `limit` > 0 caps the batches per process. A split of no rows
    gives no batches on every process.
    """
    if batch_size < 1 or processes < 1 or not 0 <= rank < processes:
        raise ValueError(f"batch_size {batch_size}, rank {rank} of {processes} processes")
    mine = np.arange(rank, count, processes)
    if lengths is not None and len(mine):
        mine = mine[np.argsort(-np.asarray(lengths)[mine], kind="stable")]
    batches = [
        EvalBatch(rows, len(rows))
        for rows in (mine[i : i + batch_size].tolist() for i in range(0, len(mine), batch_size))
    ]
    largest_share = -(-count // processes)
    total = -(-largest_share // batch_size)
    if limit:
        total = min(total, limit)
    batches = batches[:total]
    if len(batches) < total:
        filler = int(np.argmin(lengths)) if lengths is not None else 0
        batches += [EvalBatch([filler], 0)] * (total - len(batches))
    return batches
