"""`settle_heap`: the start-up heap is frozen, collections are spaced out, and cycles made while
serving are still freed (the collector is not switched off)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from bridge.heap import SERVING_THRESHOLDS, settle_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_settle_heap_freezes_start_up_and_still_frees_cycles(restored_gc: None) -> None:
    kept = [_Node() for _ in range(100)]
    frozen_before = gc.get_freeze_count()
    settle_heap()
    assert gc.isenabled()
    assert gc.get_threshold() == SERVING_THRESHOLDS
    assert gc.get_freeze_count() >= frozen_before + len(kept)
    a, b = _Node(), _Node()  # a cycle made while serving
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2
