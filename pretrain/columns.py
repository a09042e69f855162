"""Rows of the tokenized documents read as numpy slices of the memory-mapped Arrow buffers.

Drawing an example reads a few token ranges of one or two documents. Through `datasets`' row formatting that
costs a Python conversion of every column of the whole row (some 100 us a document); here a row is two offsets
and a slice of the column's values, with nothing copied until the example takes its range.
"""

from __future__ import annotations

import bisect

import datasets
import numpy as np
import pyarrow as pa


class ListColumn:
    """One list<int> column of a table: `row(i)` is row i's values as a read-only numpy view."""

    def __init__(self, column: pa.ChunkedArray):
        chunks = [chunk for chunk in column.chunks if len(chunk)]
        self.starts = np.cumsum([0, *(len(chunk) for chunk in chunks)]).tolist()  # [chunks + 1] first row of each
        # A sliced chunk's offsets index its unsliced values buffer, so the two go together as they are.
        self.parts = [(chunk.offsets.to_numpy(), chunk.values.to_numpy()) for chunk in chunks]

    def __len__(self) -> int:
        return self.starts[-1]

    def row(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a column of {len(self)}")
        k = bisect.bisect_right(self.starts, index) - 1  # a scalar search: bisect is 10x numpy's here
        offsets, values = self.parts[k]
        local = index - self.starts[k]
        return values[offsets[local] : offsets[local + 1]]

    def lengths(self) -> np.ndarray:
        """[rows] the length of every row."""
        if not self.parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(offsets).astype(np.int64) for offsets, _ in self.parts])


def list_columns(documents: datasets.Dataset, names: tuple[str, ...]) -> dict[str, ListColumn]:
    """The named list columns of `documents` (its rows in order, an indices mapping applied)."""
    table = documents.with_format("arrow")[:]  # zero-copy on a dataset read from disk without a mapping
    return {name: ListColumn(table.column(name)) for name in names}
