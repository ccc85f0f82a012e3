"""Decode ahead on the GPU runner, where it is on by default: `decode(skip=...)` leaves the skipped rows'
state untouched (graph and eager), and an engine launching each decode ahead gives the serial engine's
tokens for requests that end every way."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from cache import CacheConfig, StateCache
from server.engine import Engine, EngineConfig
from server.engine.types import GenerationRequest, TokenEvent
from server.model.gpu_runner import GpuModelRunner
from server.model.loader import load_model
from server.model.tokenizer import Tokenizer
from tests.tiny_models import make_chat_model_dir
from tests.unit.engine.test_engine import TOK_VOCAB, _collect, _prompt, _req, _running, _tokens

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-mamba2"), seed=3, tok_vocab=TOK_VOCAB)


@pytest.mark.parametrize("graphs", [True, False])
def test_skipped_rows_are_padding(model_dir: Path, graphs: bool) -> None:
    runner = GpuModelRunner(load_model(model_dir, device="cuda")[1], 4, "cuda", use_graphs=graphs)
    assert runner.computes_async
    for slot in range(3):
        runner.prefill(_prompt(9 + slot, seed=slot), slot)
    before = {k: v.clone() for k, v in runner.slot_state(1).items()}
    tokens = torch.tensor([5, 7, 9], device="cuda")
    got = runner.decode(tokens, [0, 1, 2], skip=torch.tensor([7], device="cuda"))
    for key, value in runner.slot_state(1).items():
        assert torch.equal(value, before[key])  # row 1 sampled a skipped id: its state is untouched
    ref = GpuModelRunner(load_model(model_dir, device="cuda")[1], 4, "cuda", use_graphs=graphs)
    for slot in range(3):
        ref.prefill(_prompt(9 + slot, seed=slot), slot)
    want = ref.decode([5, 9], [0, 2])
    torch.testing.assert_close(got[[0, 2]], want, rtol=1e-4, atol=1e-4)


def _engine(model_dir: Path, ahead: bool) -> Engine:
    runner = GpuModelRunner(load_model(model_dir, device="cuda")[1], 4, "cuda")
    config = EngineConfig(max_slots=4, prefill_budget=12, decode_ahead=ahead)
    return Engine(runner, Tokenizer.from_pretrained(model_dir), None, config=config)


async def _serve(engine: Engine, reqs: list[GenerationRequest]) -> list[list[TokenEvent]]:
    async def staggered(i: int, r: GenerationRequest) -> list[TokenEvent]:
        await asyncio.sleep(0.003 * i)
        return await _collect(engine, r)

    async with _running(engine):
        return list(await asyncio.gather(*(staggered(i, r) for i, r in enumerate(reqs))))


async def test_an_engine_deciding_ahead_gives_the_serial_engines_tokens(model_dir: Path) -> None:
    prompts = [_prompt(n, seed=200 + n) for n in (6, 28, 2, 17, 33)]
    serial = await _serve(_engine(model_dir, ahead=False), [_req("probe", prompts[1], max_tokens=12)])
    free = _tokens(serial[0])
    reqs = [
        _req("length", prompts[0], max_tokens=20),
        _req("stop-id", prompts[1], max_tokens=20, stop_token_ids=[free[6]]),
        _req("one", prompts[2], max_tokens=1),
        _req("min", prompts[3], max_tokens=14, min_tokens=8, stop_token_ids=[free[2]]),
        _req("penalty", prompts[4], max_tokens=24, presence_penalty=0.5),
    ]
    want = await _serve(_engine(model_dir, ahead=False), reqs)
    got = await _serve(_engine(model_dir, ahead=True), reqs)
    for w, g in zip(want, got, strict=True):
        assert _tokens(g) == _tokens(w)
        assert g[-1].finish_reason == w[-1].finish_reason


async def test_finish_checkpoints_deciding_ahead_hold_each_requests_own_state(model_dir: Path) -> None:
    """A finish capture reads the live slot at the step's end, after the step launched ahead wrote it (the
    cache takes a step's captures together): each finish checkpoint holds its own request's state after the
    tokens it is stored under, whether the last token was fed ahead (length) or not (a stop id)."""
    runner = GpuModelRunner(load_model(model_dir, device="cuda")[1], 4, "cuda")
    config = CacheConfig(
        hot_bytes=1 << 22, cold_bytes=1 << 22, hot_dtype="fp32", cold_dtype="fp32", device="cuda"
    )
    cache = StateCache(config, runner.state_spec())
    engine = Engine(
        runner,
        Tokenizer.from_pretrained(model_dir),
        cache,
        config=EngineConfig(max_slots=4, prefill_budget=64, decode_ahead=True),
    )
    prompts = [_prompt(n, seed=300 + n) for n in (7, 19, 12)]
    probe = await _serve(_engine(model_dir, ahead=False), [_req("probe", prompts[1], max_tokens=12)])
    reqs = [
        _req("length", prompts[0], max_tokens=9),
        _req("stop-id", prompts[1], max_tokens=20, stop_token_ids=[_tokens(probe[0])[4]]),
        _req("length-2", prompts[2], max_tokens=9),
    ]
    got = await _serve(engine, reqs)
    fresh = GpuModelRunner(load_model(model_dir, device="cuda")[1], 1, "cuda", use_graphs=False)
    for req, events in zip(reqs, got, strict=True):
        tokens = [*req.prompt_tokens, *_tokens(events)]
        lease = cache.lookup("anon", None, [*tokens, 0])
        assert lease is not None and lease.position >= len(tokens) - 1, req.request_id  # the finish's
        try:
            state = cache.fetch(lease)
        finally:
            cache.release(lease)
        fresh.reset(0)
        fresh.prefill(tokens[: lease.position], 0)
        for name, want in fresh.capture(0).items():
            torch.testing.assert_close(state[name], want, rtol=1e-4, atol=1e-4)
