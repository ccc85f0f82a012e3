"""A hybrid model through `build_engine` on CPU: the factory builds a `HybridRunner` and a cache with KV;
a follow-up turn resumes from a checkpoint (its KV prefix restored) and generates what a cache-less engine
generates (greedy, lossless tiers); a request longer than --max-model-len is refused; the live KV pool's
blocks are all back once slots are reset."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from cache.manager import StateCache
from server.engine import Engine, build_engine
from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from server.model.hybrid_runner import HybridRunner
from server.settings import Settings
from tests.tiny_hybrids import make_chat_hybrid_dir
from tests.unit.engine.test_engine import _running

TOK_VOCAB = 300
MAX_LEN = 96


@pytest.fixture(scope="module", params=("bamba", "nemotron_h"))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_hybrid_dir(tmp_path_factory.mktemp(request.param), request.param, seed=4)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(5, TOK_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _settings(model_dir: Path, **kw: Any) -> Settings:
    fields: dict[str, Any] = {"hot_dtype": "fp32", "cold_dtype": "fp32", "prefill_budget": 16}
    fields.update(kw)
    return Settings(model=str(model_dir), device="cpu", max_num_seqs=2, max_model_len=MAX_LEN, **fields)


async def _generate(engine: Engine, rid: str, prompt: list[int], max_tokens: int = 6) -> list[TokenEvent]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    req = GenerationRequest(rid, tuple(prompt), params, session_id="s", boundaries=(len(prompt) - 3,))
    return [e async for e in engine.generate(req)]


async def _conversation(engine: Engine) -> tuple[list[int], list[int], TokenEvent]:
    first = _prompt(37, seed=1)
    async with _running(engine):
        answer = [e.token_id for e in await _generate(engine, "a", first) if e.token_id is not None]
        events = await _generate(engine, "b", [*first, *answer, *_prompt(9, seed=2)])
    return answer, [e.token_id for e in events if e.token_id is not None], events[-1]


async def test_a_follow_up_resumes_and_matches_a_cacheless_engine(model_dir: Path) -> None:
    engine = await asyncio.to_thread(build_engine, _settings(model_dir), None)
    assert isinstance(engine.runner, HybridRunner) and isinstance(engine.cache, StateCache)
    answer, follow, last = await _conversation(engine)
    assert last.cached_tokens > 37  # the first turn's finish checkpoint, KV prefix included
    plain = await asyncio.to_thread(build_engine, _settings(model_dir, no_cache=True), None)
    assert plain.cache is None
    plain_answer, plain_follow, plain_last = await _conversation(plain)
    assert plain_last.cached_tokens == 0
    assert (answer, follow) == (plain_answer, plain_follow)


async def test_a_request_past_max_model_len_is_refused(model_dir: Path) -> None:
    engine = await asyncio.to_thread(build_engine, _settings(model_dir), None)
    async with _running(engine):
        with pytest.raises(ValueError, match="max-model-len"):
            await _generate(engine, "long", _prompt(MAX_LEN - 3, seed=3), max_tokens=4)
        events = await _generate(engine, "fits", _prompt(MAX_LEN - 4, seed=3), max_tokens=4)
    assert events[-1].finish_reason == "length"
    runner = engine.runner
    assert isinstance(runner, HybridRunner)
    for slot in range(runner.max_slots):
        runner.reset(slot)
    assert runner.kv.allocator.free == runner.kv.allocator.num_blocks
