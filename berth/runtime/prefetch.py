"""Batches prepared ahead of the training step, in a background thread.

Drawing examples, masking, packing and collating run in Python and on the CPU; in the training thread they would
add to every step what the accelerator then waits for. `Prefetched` runs the stage's step iterator in a thread a
few steps ahead (pinning the tensors in page-locked memory on CUDA, so the copy to the device can overlap), and
hands the steps over in order. The data position stays the loop's step count: steps drawn ahead but not taken are
dropped when the loop stops, and a resumed run draws them again from the same seeds. Every random draw of the
collators uses its own seeded generator, so the thread changes no random stream of the training thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")
# Steps ahead where train.prefetch is auto and the step runs on an accelerator: enough to cover the burst of
# drawing a new chunk of examples (bench/prefetch_bench.py).
PREFETCH_AUTO = 16
_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetched(Generic[T]):
    """Iterate `source` `depth` items ahead in a thread, each passed through `prepare`; a context manager that
    stops the thread on exit. An exception in the thread is raised in the consumer when it reaches that item."""

    def __init__(self, source: Iterator[T], depth: int, prepare: Callable[[T], T] | None = None):
        if depth < 1:
            raise ValueError(f"depth must be at least 1; got {depth}")
        self._items: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(source, prepare), name="berth-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, source: Iterator[T], prepare: Callable[[T], T] | None) -> None:
        try:
            for item in source:
                if not self._put(prepare(item) if prepare else item):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(_Failure(error))
            return
        self._put(_END)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        item = self._items.get()
        if item is _END:
            self._items.put(_END)  # every later call ends too
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def __enter__(self) -> Prefetched[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pinned(micro_batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """A step's micro-batches in page-locked memory, so that the copy to the GPU runs asynchronously."""
    return [{k: v.pin_memory() for k, v in b.items()} for b in micro_batches]
