"""Batches prepared ahead in a thread: the same items in the same order, errors raised where they happened, and a
thread that stops when the loop does."""

import itertools
import time

import pytest

from berth.runtime.prefetch import Prefetched


def test_every_item_arrives_in_order_through_prepare():
    with Prefetched(iter(range(50)), depth=3, prepare=lambda x: x * 2) as items:
        assert list(items) == [2 * i for i in range(50)]
        assert list(items) == []  # exhausted stays exhausted


def test_an_error_in_the_thread_is_raised_at_its_item():
    def source():
        yield 1
        yield 2
        raise ValueError("bad example 3")

    with Prefetched(source(), depth=2) as items:
        assert next(items) == 1 and next(items) == 2
        with pytest.raises(ValueError, match="bad example 3"):
            next(items)


def test_leaving_early_stops_the_thread_of_an_endless_source():
    drawn = []

    def endless():
        for i in itertools.count():
            drawn.append(i)
            yield i

    items = Prefetched(endless(), depth=2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    assert not items._thread.is_alive()
    count = len(drawn)
    time.sleep(0.3)
    assert len(drawn) == count <= 3 + 2 + 1  # taken, queued, and the one waiting to be queued


def test_the_work_is_done_ahead_of_the_consumer():
    def slow():
        for i in range(4):
            time.sleep(0.2)
            yield i

    items = Prefetched(slow(), depth=4)
    time.sleep(1.0)  # the consumer is busy (a training step): the thread draws meanwhile
    start = time.perf_counter()
    assert list(items) == [0, 1, 2, 3]
    assert time.perf_counter() - start < 0.2  # all were ready
    items.close()


def test_depth_below_one_is_refused():
    with pytest.raises(ValueError, match="depth must be at least 1"):
        Prefetched(iter([]), depth=0)
