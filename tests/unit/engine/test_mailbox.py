"""`Mailbox`: a consumer gets everything pending at once, in order, and waits while there is nothing."""

from __future__ import annotations

import asyncio

from server.engine.mailbox import Mailbox


async def test_take_returns_every_pending_item_in_order() -> None:
    box: Mailbox[int] = Mailbox()
    for i in range(5):
        box.put(i)
    assert len(box) == 5
    assert await box.take() == [0, 1, 2, 3, 4]
    assert len(box) == 0


async def test_take_waits_for_the_next_put() -> None:
    box: Mailbox[str] = Mailbox()
    taker = asyncio.create_task(box.take())
    await asyncio.sleep(0)
    assert not taker.done()
    box.put("a")
    box.put("b")
    assert await asyncio.wait_for(taker, 1) == ["a", "b"]


async def test_a_cancelled_take_loses_nothing() -> None:
    box: Mailbox[int] = Mailbox()
    taker = asyncio.create_task(box.take())
    await asyncio.sleep(0)
    taker.cancel()
    await asyncio.gather(taker, return_exceptions=True)
    box.put(1)
    assert await box.take() == [1]
