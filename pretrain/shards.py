"""The tokenized documents on disk: each split a folder of Arrow stream files, written batch by batch.

Splitting the tokenized corpus into train and validation reads it through ordinary file reads, one record batch
at a time, and appends each batch's rows to its split's current shard. Memory-mapping the corpus instead (what
`Dataset.filter` and `save_to_disk` do) leaves every page read resident in the process, so its memory grew with
the corpus; here a batch's buffers are freed once written. The files are the ones `save_to_disk` writes (Arrow
streams with datasets' features in the schema), so folders written either way load alike.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc

# A shard is closed once this many bytes went into it.
SHARD_BYTES = 100 * 2**20
# Rows are written in record batches of about this size: opening a memory-mapped file reads every batch's
# header, and the kernel maps the pages around each one, so a file of small batches (datasets writes 1,000 rows
# at a time) is mostly resident once opened.
BATCH_BYTES = 16 * 2**20


class ShardWriter:
    """Arrow stream files data-00000.arrow, data-00001.arrow, ... in `folder`, each about SHARD_BYTES."""

    def __init__(self, folder: Path, schema: pa.Schema, limit: int = SHARD_BYTES):
        self.folder, self.schema, self.limit = folder, schema, limit
        folder.mkdir(parents=True, exist_ok=True)
        self.shards = self.rows = 0
        self.pending: list[pa.RecordBatch] = []  # rows not yet written, gathered into one record batch
        self.pending_bytes = 0
        self._open()

    def _open(self) -> None:
        self.sink = pa.OSFile(str(self.folder / f"data-{self.shards:05d}.arrow"), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.shards += 1
        self.written = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        self.pending.append(batch)
        self.pending_bytes += batch.nbytes
        self.rows += batch.num_rows
        if self.pending_bytes >= min(BATCH_BYTES, self.limit):
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        if self.written >= self.limit:
            self.writer.close()
            self.sink.close()
            self._open()
        for batch in pa.Table.from_batches(self.pending, self.schema).combine_chunks().to_batches():
            self.writer.write_batch(batch)
        self.written += self.pending_bytes
        self.pending, self.pending_bytes = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self.sink.close()


def write_splits(
    dataset: datasets.Dataset, folder: Path, split_column: str, names: tuple[str, str], limit: int = SHARD_BYTES
) -> dict[str, int]:
    """`dataset`'s rows into folder/names[0] (where `split_column` is false) and folder/names[1] (true), in order;
    returns the rows each got.

    Reads the dataset's own cache files, which must hold its rows in order (a `map` result: no indices mapping)."""
    files = [Path(f["filename"]) for f in dataset.cache_files]
    schema = dataset.data.schema
    writers = {name: ShardWriter(folder / name, schema, limit) for name in names}
    rows = 0
    try:
        for file in files:
            with pa.OSFile(str(file)) as source:
                for batch in pa.ipc.open_stream(source):
                    chosen = batch.column(split_column)
                    writers[names[0]].write(batch.filter(pc.invert(chosen)))
                    writers[names[1]].write(batch.filter(chosen))
                    rows += batch.num_rows
    finally:
        for writer in writers.values():
            writer.close()
    if rows != len(dataset):
        raise RuntimeError(f"the cache files of a dataset of {len(dataset)} rows hold {rows}: not a map result")
    return {name: writer.rows for name, writer in writers.items()}


def load_split(folder: Path) -> datasets.Dataset:
    """A split's shards, memory-mapped, as one dataset."""
    shards = sorted(folder.glob("*.arrow"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no .arrow shards")
    parts = [datasets.Dataset.from_file(str(shard)) for shard in shards]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
