"""`Mailbox`: one request's events, from the engine loop to the request's consumer on the same loop.

An `asyncio.Queue` costs a wake per item. A mailbox hands the consumer everything that arrived since it
last looked in one wake: `put` appends (and wakes a waiting consumer), `take` waits for at least one item
and returns all of them, in order. A consumer that keeps up gets one event per engine step; one that fell
behind gets the backlog at once, and can send it as one chunk.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    """Single consumer; `put` and `take` run on the event loop's thread."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[T]:
        """Every pending item, oldest first; waits while there is none."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items

    def __len__(self) -> int:
        return len(self._items)
