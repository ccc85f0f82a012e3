"""A request's events as the engines hand them over: in batches, each the next event and every one
already queued behind it.

`Engine` and `EngineClient` queue each request's `TokenEvent`s (or the exception that ends it) on an
`asyncio.Queue` as the steps deliver them. `event_batches` takes them off in batches: one event per step
while the consumer keeps up, several when it fell behind (the HTTP event loop busy with other streams),
so that the streaming layer writes them together (`server.api.streaming`). `one_by_one` turns batches
back into single events, for the callers that want those.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any, TypeVar

from server.engine.types import TokenEvent

T = TypeVar("T")
EventQueue = asyncio.Queue[TokenEvent | BaseException]


async def event_batches(queue: EventQueue) -> AsyncGenerator[list[TokenEvent], None]:
    """Batches of a request's events, in order, until its finishing event (the last of its batch). An
    exception in the queue is raised once the events queued before it have been yielded."""
    while True:
        batch, ended = _take_ready([], await queue.get(), queue)
        if batch:
            yield batch
        if isinstance(ended, BaseException):
            raise ended
        if ended:
            return


def _take_ready(
    batch: list[TokenEvent], item: TokenEvent | BaseException, queue: EventQueue
) -> tuple[list[TokenEvent], BaseException | bool]:
    """`item` and the items queued behind it, up to a finishing event or an exception; with whether the
    request ended (True, or the exception that ended it)."""
    while True:
        if isinstance(item, BaseException):
            return batch, item
        batch.append(item)
        if item.finish_reason is not None:
            return batch, True
        if queue.empty():
            return batch, False
        item = queue.get_nowait()


async def one_by_one(batches: AsyncGenerator[list[T], None]) -> AsyncGenerator[T, None]:
    """The items of `batches` one at a time; closing this closes `batches`."""
    async with contextlib.aclosing(batches) as items:
        async for batch in items:
            for item in batch:
                yield item


def resolve(future: asyncio.Future[Any] | None, value: Any) -> None:
    """Set a future's result, or its exception if `value` is one (no-op once done)."""
    if future is None or future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)
