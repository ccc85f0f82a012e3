"""Driving the engine for one HTTP request: fan-out merge, collection, disconnect, error mapping.

Events come from the engine in batches (`generate_batches`: one event per step while the stream keeps
up, several when it fell behind), and go on as batches to the stream, which writes each at once.
Every engine iterator is closed with `aclose()` however the request ends (finish, client
disconnect, cancellation, error): closing it is what aborts the request and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from typing import Any, Protocol, TypeVar

from starlette.requests import Request

from server.api.errors import APIError
from server.engine.types import EngineShutdown, GenerationRequest, TokenEvent

log = logging.getLogger(__name__)
T = TypeVar("T")


class GeneratingEngine(Protocol):
    def generate_batches(self, req: GenerationRequest) -> AsyncIterator[list[TokenEvent]]: ...


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


_DONE = object()


@contextlib.asynccontextmanager
async def closing(events: AsyncIterator[T]) -> AsyncGenerator[AsyncIterator[T], None]:
    """Like `contextlib.aclosing` for any async iterator (closed if it can be)."""
    try:
        yield events
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def _pump(
    engine: GeneratingEngine, index: int, req: GenerationRequest, queue: asyncio.Queue[Any]
) -> None:
    try:
        async with closing(engine.generate_batches(req)) as batches:
            async for batch in batches:
                await queue.put((index, batch))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await queue.put(exc)
        return
    await queue.put(_DONE)


async def merged_batches(
    engine: GeneratingEngine, reqs: Sequence[GenerationRequest]
) -> AsyncGenerator[tuple[int, list[TokenEvent]], None]:
    """(choice index, a batch of its events) from every request, interleaved as they come. Close it to
    abort all."""
    if len(reqs) == 1:
        async with closing(engine.generate_batches(reqs[0])) as batches:
            async for batch in batches:
                yield 0, batch
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(engine, i, r, queue)) for i, r in enumerate(reqs)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(engine: GeneratingEngine, reqs: Sequence[GenerationRequest]) -> list[list[TokenEvent]]:
    """Every event of every choice, in order, per choice."""
    out: list[list[TokenEvent]] = [[] for _ in reqs]
    async with contextlib.aclosing(merged_batches(engine, reqs)) as batches:
        async for index, batch in batches:
            out[index].extend(batch)
    return out


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising `ClientDisconnected`) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


def shutting_down(message: str = "The server is shutting down.") -> APIError:
    return APIError(503, message, code="server_shutting_down", headers={"Retry-After": "5"})


def engine_error(exc: Exception) -> APIError:
    """An engine exception as an API error: bad input is 400, anything else 503 (retryable)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return APIError(400, str(exc) or "invalid request", code="invalid_value")
    if isinstance(exc, EngineShutdown):
        return shutting_down(str(exc))
    log.exception("engine error", exc_info=exc)
    return APIError(
        503,
        "The engine could not complete the request; try again.",
        code="engine_error",
        headers={"Retry-After": "1"},
    )
