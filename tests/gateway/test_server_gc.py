"""The serving process tunes Python's cycle collector once it is serving (gateway.server.tune_gc)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.server import GC_YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tune_gc_collects_young_objects_less_often(restored_gc: None) -> None:
    middle, old = gc.get_threshold()[1:]
    tune_gc()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, middle, old)
    assert GC_YOUNG_THRESHOLD > 700  # Python's default


def test_tune_gc_keeps_what_startup_built_out_of_later_collections(restored_gc: None) -> None:
    built = {"config": ["made", "before", "serving"]}
    assert any(obj is built for obj in gc.get_objects())
    tune_gc()
    assert all(obj is not built for obj in gc.get_objects())  # frozen: in no generation any more
    assert gc.get_freeze_count() > 0
