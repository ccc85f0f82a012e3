"""`--state-dtype bf16` end to end on CPU: `build_engine` gives a runner with a bf16 ssm pool and a cache on
its bf16 spec, which serves a chat and resumes a follow-up turn from a checkpoint; and a bf16 slot captured
into the cache and fetched into another slot holds the same ssm state (FP16 storage holds bf16 exactly)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from cache.config import CacheConfig
from cache.manager import StateCache
from server.engine import Engine, build_engine
from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from server.model.loader import load_model
from server.model.runner import ModelRunner
from server.settings import Settings
from tests.tiny_models import make_chat_model_dir
from tests.unit.engine.test_engine import _running

TOK_VOCAB = 300
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-mamba2-bf16"), seed=3, tok_vocab=TOK_VOCAB)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(5, TOK_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def _generate(engine: Engine, rid: str, prompt: list[int]) -> list[TokenEvent]:
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    req = GenerationRequest(rid, tuple(prompt), params, session_id="s")
    return [e async for e in engine.generate(req)]


async def test_build_engine_with_a_bf16_state_serves_and_resumes(model_dir: Path) -> None:
    settings = Settings(
        model=str(model_dir), device="cpu", max_num_seqs=2, state_dtype="bf16", prefill_budget=64
    )
    engine = await asyncio.to_thread(build_engine, settings, None)
    assert engine.runner.pool.ssm.dtype == BF16 and engine.runner.state_spec()["ssm"][1] == BF16
    cache = engine.cache
    assert isinstance(cache, StateCache) and cache.spec["ssm"][1] == BF16
    first = _prompt(20, seed=1)
    async with _running(engine):
        events = await _generate(engine, "a", first)
        answer = [e.token_id for e in events if e.token_id is not None]
        follow = await _generate(engine, "b", [*first, *answer, *_prompt(5, seed=2)])
    assert len(answer) == 4 and follow[-1].finish_reason is not None
    assert cache.stats().tokens_reused > len(first)  # the follow-up resumed from a checkpoint


def test_a_bf16_slot_round_trips_through_the_cache(model_dir: Path) -> None:
    runner = ModelRunner(load_model(model_dir)[1], 3, state_dtype=BF16)
    config = CacheConfig(hot_bytes=0, cold_bytes=1 << 22, cold_dtype="fp16")
    cache = StateCache(config, runner.state_spec())
    prompt = _prompt(17, seed=3)
    runner.prefill(prompt, 0)
    assert cache.capture("ns", "s", prompt, runner.capture(0), reason="test")
    runner.prefill(_prompt(9, seed=4), 2)  # the target slot holds another live state first
    lease = cache.lookup("ns", "s", [*prompt, 1])
    assert lease is not None
    cache.fetch(lease, out=runner.slot_state(2))
    cache.release(lease)
    saved, restored = runner.capture(0), runner.capture(2)
    assert torch.equal(restored["ssm"], saved["ssm"])  # bf16 in FP16 storage: exact
    torch.testing.assert_close(restored["conv"], saved["conv"], rtol=2**-11, atol=0)  # fp32 conv in FP16
    logits = runner.decode([11, 11], [0, 2])
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-3)  # the conv's FP16 rounding
