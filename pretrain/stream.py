"""The examples of an epoch, drawn from the tokenized documents as the loader reaches them, never written out.

An epoch is a stream: the document groups (GROUP_SIZE documents each) in an order drawn from (seed, epoch); taken
CHUNK_GROUPS groups at a time, each group's examples drawn by `ExampleBuilder` (seeded by seed, epoch and document,
as always) as recipes (token ranges), and the recipes of a chunk shuffled together by (seed, epoch, chunk). Only a
summary is stored for each epoch (per group: how many examples, tokens, truncations and labels; per document: how
many examples), so the prepared data stays the size of the tokenized corpus whatever the number of epochs, and a
resumed run jumps to its chunk without drawing the ones before it. With the per-document counts, asking for an
example draws only the document it comes from (nsp, sop), and only as far as that example (a document's recipes are
drawn in order, and the draw stops there until a later one is asked for), and its tokens are read only then: a
process draws and reads its own share alone, but for the earlier recipes of its documents.

The same seed gives the same stream on every process and for any `num_proc`, so a step holds the same examples
whatever the number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, overload

import datasets
import numpy as np
from tqdm.auto import tqdm

from berth.pretrain.config import DataConfig
from berth.pretrain.data import GROUP_SIZE, ExampleBuilder, Recipe
from berth.pretrain.documents import SpecialIds

# Groups whose examples are shuffled together: 8 x 256 documents, some 10^4 examples of the Chinese corpus in
# memory at a time. Fixed, so the stream does not depend on anything but the seed.
CHUNK_GROUPS = 8

# Bump when the summary's layout changes (part of the examples key, so older summaries are counted again).
SUMMARY_VERSION = 2
COUNTS = ("examples", "tokens", "truncated", "positives", "labelled")
SUMMARY_FEATURES = datasets.Features(
    {
        "examples": datasets.Value("int64"),
        "tokens": datasets.Value("int64"),
        "truncated": datasets.Value("int64"),
        "positives": datasets.Value("int64"),  # next_sentence_label 0: true continuation / in order
        "labelled": datasets.Value("int64"),
        # nsp, sop: the examples of each document of the group, so that a process draws only the documents that
        # hold its own examples; none (packed across documents): empty
        "document_examples": datasets.Sequence(datasets.Value("int32")),
    }
)


class GroupSummary:
    """Batched `datasets.map` function over group numbers: what each group's examples amount to."""

    def __init__(self, builder: ExampleBuilder):
        self.builder = builder

    def __call__(self, batch: dict[str, list[int]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in SUMMARY_FEATURES}
        builder = self.builder
        for group in batch["group"]:
            if builder.per_document:
                by_document = [builder.document_recipes(d) for d in builder.group_documents(group)]
                recipes = [r for drawn in by_document for r in drawn]
                out["document_examples"].append([len(drawn) for drawn in by_document])
            else:
                recipes = builder.group_recipes(group)
                out["document_examples"].append([])
            out["examples"].append(len(recipes))
            out["tokens"].append(sum(r.length for r in recipes))
            out["truncated"].append(sum(r.truncated for r in recipes))
            out["positives"].append(sum(r.label == 0 for r in recipes))
            out["labelled"].append(sum(r.label >= 0 for r in recipes))
        return out


@dataclass
class Drawing:
    """A document's recipes drawn so far, and the draw that goes on from there (its RNG where it stopped)."""

    recipes: list[Recipe]
    rest: Iterator[Recipe]

    def recipe(self, k: int) -> Recipe:
        """Recipe k, drawing on only as far as it."""
        while len(self.recipes) <= k:
            self.recipes.append(next(self.rest))
        return self.recipes[k]


@dataclass
class ChunkPlan:
    """Where chunk's shuffled examples come from: example i is recipe order[i] of the chunk's documents in order,
    found through their cumulative example counts; each document drawn, as far as its examples asked for so far,
    when one of them is asked for."""

    order: np.ndarray  # [examples] the chunk's shuffle
    documents: np.ndarray  # [documents] in the chunk's order (its groups in epoch order, each in document order)
    starts: np.ndarray  # [documents + 1] each document's first recipe in the unshuffled chunk
    drawn: dict[int, Drawing] = field(default_factory=dict)


class Collective(Protocol):
    """The processes of a run that count an epoch together (`berth.runtime.collective.Collective`)."""

    rank: int
    processes: int
    writer: bool  # this process writes the summary file for the processes that share its cache

    def all(self, flag: bool) -> bool: ...

    def gather(self, items: list[Any]) -> list[Any]: ...


class EpochStream:
    """The examples of one epoch of a split, in training order: `len`, indexing (int or slice) and iteration.

    Indexing in order is cheap (one chunk's recipes drawn at a time, kept until the next is asked for; an example's
    tokens read when it is asked for); jumping back and forth between chunks draws them again.
    """

    def __init__(
        self,
        documents: datasets.Dataset,
        data: DataConfig,
        special: SpecialIds,
        epoch: int,
        summary_file: Path,
        fingerprint: str,
        desc: str,
        collective: Collective | None = None,
    ):
        self.data, self.epoch = data, epoch
        self.builder = ExampleBuilder(documents, data, special, epoch) if len(documents) else None
        n_groups = math.ceil(len(documents) / GROUP_SIZE)
        self.group_order = np.random.default_rng([data.seed, epoch, 2]).permutation(n_groups)
        if collective is not None and collective.processes > 1 and self.builder is not None:
            self.summary = self._summarise_together(n_groups, summary_file, fingerprint, desc, collective)
        else:
            self.summary = self._summarise(n_groups, summary_file, fingerprint, desc)
        per_group = np.asarray(self.summary["examples"], dtype=np.int64)
        chunks = [self.group_order[i : i + CHUNK_GROUPS] for i in range(0, n_groups, CHUNK_GROUPS)]
        self.chunk_groups = chunks
        sizes = np.array([per_group[c].sum() for c in chunks], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # [chunks + 1]
        self._cached: tuple[int, list[Recipe]] | None = None
        self._plan: tuple[int, ChunkPlan] | None = None

    def _summarise(self, n_groups: int, path: Path, fingerprint: str, desc: str) -> datasets.Dataset:
        if self.builder is None:
            return datasets.Dataset.from_dict({k: [] for k in SUMMARY_FEATURES}, features=SUMMARY_FEATURES)
        path.parent.mkdir(parents=True, exist_ok=True)
        groups = datasets.Dataset.from_dict({"group": list(range(n_groups))})
        return groups.map(
            GroupSummary(self.builder),
            batched=True,
            batch_size=1,
            remove_columns=["group"],
            features=SUMMARY_FEATURES,
            num_proc=min(self.data.num_proc, n_groups) if n_groups > 1 else None,
            cache_file_name=str(path),
            new_fingerprint=fingerprint,
            desc=desc,
        )

    def _summarise_together(
        self, n_groups: int, path: Path, fingerprint: str, desc: str, collective: Collective
    ) -> datasets.Dataset:
        """The summary counted by every process, each the groups g = rank (mod processes), and gathered: no process
        draws the epoch alone while the others wait. Read from the cache when every process has it."""
        if collective.all(path.is_file()):
            return datasets.Dataset.from_file(str(path))
        assert self.builder is not None
        count = GroupSummary(self.builder)
        mine = range(collective.rank, n_groups, collective.processes)
        rows = [
            (g, {k: v[0] for k, v in count({"group": [g]}).items()})
            for g in tqdm(mine, desc=desc, disable=collective.rank != 0)
        ]
        every = dict(collective.gather(rows))
        summary = datasets.Dataset.from_dict(
            {k: [every[g][k] for g in range(n_groups)] for k in SUMMARY_FEATURES}, features=SUMMARY_FEATURES
        )
        if collective.writer:
            # written as the cache file the one-process path reads (an Arrow stream), under a temporary name first
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{path.name}")
            summary.map(batched=True, cache_file_name=str(tmp), new_fingerprint=fingerprint)
            tmp.replace(path)
        return summary

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _order(self, index: int, size: int) -> np.ndarray:
        return np.random.default_rng([self.data.seed, self.epoch, 3, index]).permutation(size)

    def chunk(self, index: int) -> list[Recipe]:
        """The recipes of chunk `index`'s examples, shuffled together (every document of the chunk drawn)."""
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        assert self.builder is not None
        recipes = [r for g in self.chunk_groups[index] for r in self.builder.group_recipes(int(g))]
        shuffled = [recipes[i] for i in self._order(index, len(recipes))]
        self._cached = (index, shuffled)
        return shuffled

    def plan(self, index: int) -> ChunkPlan:
        """Chunk `index`'s shuffle and its documents' example counts (from the summary), nothing drawn yet."""
        if self._plan is not None and self._plan[0] == index:
            return self._plan[1]
        assert self.builder is not None
        groups = [int(g) for g in self.chunk_groups[index]]
        documents = np.concatenate([np.asarray(self.builder.group_documents(g)) for g in groups])
        counts = np.concatenate([np.asarray(self.summary[g]["document_examples"], dtype=np.int64) for g in groups])
        size = int(self.offsets[index + 1] - self.offsets[index])
        plan = ChunkPlan(self._order(index, size), documents, np.concatenate([[0], np.cumsum(counts)]))
        self._plan = (index, plan)
        return plan

    def recipe(self, index: int) -> Recipe:
        """The recipe of example `index` of the epoch, drawing only the document it comes from, and that only as far
        as this example (nsp, sop)."""
        chunk = int(np.searchsorted(self.offsets, index, side="right")) - 1
        position = index - int(self.offsets[chunk])
        assert self.builder is not None
        if not self.builder.per_document:
            return self.chunk(chunk)[position]
        plan = self.plan(chunk)
        r = int(plan.order[position])
        k = int(np.searchsorted(plan.starts, r, side="right")) - 1
        document = int(plan.documents[k])
        if document not in plan.drawn:
            plan.drawn[document] = Drawing([], self.builder.recipe_stream(document))
        return plan.drawn[document].recipe(r - int(plan.starts[k]))

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of an epoch of {len(self)}")
        assert self.builder is not None
        return self.builder.example(self.recipe(index))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for chunk in range(len(self.chunk_groups)):
            for recipe in self.chunk(chunk):
                yield self.builder.example(recipe)  # type: ignore[union-attr]  # chunks exist only with a builder

    def stats(self, max_seq_len: int) -> dict[str, Any]:
        """Examples, tokens, mean length, padding if padded to max_seq_len, positive share, truncations."""
        totals = {name: int(np.asarray(self.summary[name], dtype=np.int64).sum()) for name in COUNTS}
        n = totals["examples"]
        return {
            "examples": n,
            "tokens": totals["tokens"],
            "mean_length": round(totals["tokens"] / n, 1) if n else 0.0,
            # padding if every example were padded to max_seq_len; collate-time padding to the batch's longest is less
            "padding_fraction": round(1.0 - totals["tokens"] / max(n * max_seq_len, 1), 4),
            "positive_share": round(totals["positives"] / totals["labelled"], 4) if totals["labelled"] else None,
            "truncated_examples": totals["truncated"],
        }
