"""`event_batches`: a request's queued events in batches of what is ready, in order, ending at its finish
or its exception; `one_by_one` hands them out singly and closes the batches when closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from server.engine.events import EventQueue, event_batches, one_by_one
from server.engine.types import EngineError, FinishReason, TokenEvent


def _event(text: str, finish: FinishReason | None = None) -> TokenEvent:
    return TokenEvent("r", 1, text, finish_reason=finish)


def _queue(*items: TokenEvent | BaseException) -> EventQueue:
    queue: EventQueue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    return queue


async def _texts(batches: AsyncGenerator[list[TokenEvent], None]) -> list[list[str]]:
    return [[e.text for e in batch] async for batch in batches]


async def test_what_is_queued_together_comes_out_as_one_batch() -> None:
    queue = _queue(_event("a"), _event("b"))
    batches = event_batches(queue)
    assert [e.text for e in await anext(batches)] == ["a", "b"]
    later = asyncio.create_task(anext(batches))
    await asyncio.sleep(0)
    queue.put_nowait(_event("c"))
    queue.put_nowait(_event("d", FinishReason.STOP))
    assert [e.text for e in await later] == ["c", "d"]
    with pytest.raises(StopAsyncIteration):
        await anext(batches)


async def test_the_finishing_event_ends_its_batch_and_the_stream() -> None:
    queue = _queue(_event("a", FinishReason.LENGTH), _event("stray"))
    assert await _texts(event_batches(queue)) == [["a"]]


async def test_an_exception_comes_after_the_events_queued_before_it() -> None:
    batches = event_batches(_queue(_event("a"), _event("b"), EngineError("boom"), _event("never")))
    assert [e.text for e in await anext(batches)] == ["a", "b"]
    with pytest.raises(EngineError, match="boom"):
        await anext(batches)


async def test_one_by_one_yields_singly_and_closes_the_batches_when_closed() -> None:
    closed: list[bool] = []

    async def batches() -> AsyncGenerator[list[int], None]:
        try:
            yield [1, 2]
            yield [3]
        finally:
            closed.append(True)

    items = one_by_one(batches())
    assert [await anext(items), await anext(items)] == [1, 2]
    await items.aclose()
    assert closed == [True]
