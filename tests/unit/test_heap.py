"""`freeze_heap`: what is alive when it runs leaves the collector's generations (no later collection
traverses it); what is allocated afterwards is tracked as before."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from server.heap import freeze_heap


@pytest.fixture
def unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()


def _tracked(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_objects_alive_at_the_freeze_leave_the_generations(unfreeze: None) -> None:
    before = [[]]
    assert _tracked(before)
    freeze_heap()
    assert gc.get_freeze_count() > 0
    assert not _tracked(before)


def test_objects_allocated_after_the_freeze_are_still_collected(unfreeze: None) -> None:
    freeze_heap()
    after: list[object] = []
    after.append(after)  # a cycle: only the collector frees it
    assert _tracked(after)
    del after
    assert gc.collect() >= 1
