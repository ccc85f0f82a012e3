"""`EngineClient` against a real spawned core on a tiny model: requests, aborts, queries, stop, and a core
that dies under it."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from server.engine.client import EngineClient
from server.engine.types import EngineError, EngineNotReady, TokenEvent
from server.metrics import Metrics
from server.settings import Settings
from tests.integration.server_proc import pid_alive
from tests.unit.engine.test_engine import _prompt, _req

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_chat_model_dir

    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-client"), seed=3, tok_vocab=300)


def _client(model_dir: Path, metrics: Metrics) -> EngineClient:
    settings = Settings(model=str(model_dir), device="cpu", max_num_seqs=2, engine_process=True)
    return EngineClient(settings, metrics)


async def _first(client: EngineClient, rid: str) -> TokenEvent:
    events = client.generate(_req(rid, _prompt(8, 1), max_tokens=100_000))
    first = await anext(events)
    await events.aclose()  # aborts it in the core
    return first


async def test_requests_queries_and_a_clean_stop(model_dir: Path) -> None:
    metrics = Metrics(process_collectors=False)
    client = _client(model_dir, metrics)
    await client.start()
    assert client.ready and client.pid is not None and client.tokenizer.vocab_size > 0
    info = {"model": str(model_dir.name), "arch": "mamba2", "dtype": "fp32", "device": "cpu"}
    assert metrics.registry.get_sample_value("tssc_model_info", info) == 1  # already when ready
    events = [e async for e in client.generate(_req("a", _prompt(12, 2), max_tokens=4, session="s"))]
    assert [e.completion_tokens for e in events] == [1, 2, 3, 4]
    assert (await _first(client, "long")).completion_tokens == 1
    for _ in range(100):  # the abort reaches the core, which frees the slot
        if (await client.stats()).num_running == 0:
            break
        await asyncio.sleep(0.05)
    assert client.num_running == 0
    assert metrics.registry.get_sample_value("tssc_requests_total", {"finish_reason": "abort"}) == 1
    assert (await client.session_info("anon", "s") or {})["checkpoints"]
    assert (await client.delete_session("anon", "s") or 0) > 0
    pid = client.pid
    await client.stop()
    assert not pid_alive(pid) and not client.ready and client.failure is None
    with pytest.raises(EngineNotReady):
        await anext(client.generate(_req("late", _prompt(4, 3))))


async def test_a_dead_core_fails_open_requests_and_queries(model_dir: Path) -> None:
    client = _client(model_dir, Metrics(process_collectors=False))
    await client.start()
    events = client.generate(_req("open", _prompt(8, 4), max_tokens=100_000))
    await anext(events)
    assert client.pid is not None
    os.kill(client.pid, signal.SIGKILL)
    with pytest.raises(EngineError, match="killed by SIGKILL"):
        async for _ in events:
            pass
    assert not client.ready and client.failure is not None and "SIGKILL" in client.failure
    with pytest.raises(EngineNotReady):
        await client.stats()
    await client.stop()  # returns at once: nothing left to stop
