"""`Engine.generate_batches`: a consumer that falls behind gets its backlog in one item, every event once and
in order, the same tokens as `generate`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from server.engine.types import FinishReason, TokenEvent
from tests.unit.engine.test_engine import _collect, _make_engine, _prompt, _req, _running, _tokens
from tests.unit.engine.test_engine import model_dir as model_dir  # the fixture


async def test_a_slow_consumer_gets_its_backlog_at_once_in_order(model_dir: Path) -> None:
    async with _running(_make_engine(model_dir, slots=2)) as engine:
        expected = await _collect(engine, _req("one-by-one", _prompt(8, 5), max_tokens=12))
        batches: list[list[TokenEvent]] = []
        async for events in engine.generate_batches(_req("slow", _prompt(8, 5), max_tokens=12)):
            batches.append(events)
            await asyncio.sleep(0.05)  # several steps go by before the next look
        flat = [e for events in batches for e in events]
        assert _tokens(flat) == _tokens(expected)
        assert [e.completion_tokens for e in flat] == list(range(1, 13))
        assert any(len(events) > 1 for events in batches)
        assert flat[-1].finish_reason == FinishReason.LENGTH
        assert engine.num_running == 0
