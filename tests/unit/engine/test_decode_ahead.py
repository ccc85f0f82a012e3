"""Decode ahead (`server.engine.ahead`) on the torch runner, where it is off by default and forced on here:
the same tokens as the serial step for every way a request ends, the next decode really computed ahead,
and finish checkpoints keyed by exactly the tokens their state consumed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from cache.manager import StateCache
from server.engine import Engine, EngineConfig
from server.engine.types import FinishReason, GenerationRequest, TokenEvent
from server.model.loader import load_model
from server.model.runner import ModelRunner
from server.model.tokenizer import Tokenizer
from tests.tiny_models import make_chat_model_dir
from tests.unit.engine.test_engine import (
    TOK_VOCAB,
    _collect,
    _lossless_cache,
    _prompt,
    _req,
    _running,
    _tokens,
)


class CountingRunner(ModelRunner):
    """The torch runner, counting the rows it decodes ahead (with `skip`) and the rows it decodes late."""

    ahead_rows = 0
    late_rows = 0

    def decode(
        self, tokens: Sequence[int] | Tensor, slots: Sequence[int] | Tensor, skip: Tensor | None = None
    ) -> Tensor:
        n = sum(1 for s in slots if int(s) >= 0)
        if skip is not None or isinstance(tokens, Tensor):
            self.ahead_rows += n
        else:
            self.late_rows += n
        return super().decode(tokens, slots, skip)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-mamba2"), seed=3, tok_vocab=TOK_VOCAB)


def _engine(model_dir: Path, ahead: bool, slots: int = 4, cache: bool = True) -> Engine:
    runner = CountingRunner(load_model(model_dir)[1], max_slots=slots)
    state_cache = _lossless_cache(runner) if cache else None
    config = EngineConfig(max_slots=slots, prefill_budget=12, decode_ahead=ahead)
    return Engine(runner, Tokenizer.from_pretrained(model_dir), state_cache, config=config)


async def _serve(engine: Engine, reqs: Sequence[GenerationRequest]) -> list[list[TokenEvent]]:
    async def staggered(i: int, r: GenerationRequest) -> list[TokenEvent]:
        await asyncio.sleep(0.005 * i)  # later arrivals join a batch already decoding
        return await _collect(engine, r)

    async with _running(engine):
        return list(await asyncio.gather(*(staggered(i, r) for i, r in enumerate(reqs))))


async def _greedy(model_dir: Path, prompt: tuple[int, ...], n: int) -> list[int]:
    async with _running(_engine(model_dir, ahead=False, slots=1, cache=False)) as engine:
        return _tokens(await _collect(engine, _req("probe", prompt, max_tokens=n)))


async def test_decode_ahead_gives_the_serial_steps_tokens_for_every_way_a_request_ends(
    model_dir: Path,
) -> None:
    prompts = [_prompt(n, seed=100 + n) for n in (7, 30, 3, 19, 11, 25)]
    free = await _greedy(model_dir, prompts[1], 12)
    text = Tokenizer.from_pretrained(model_dir).decode(free[5:7])
    reqs = [
        _req("length", prompts[0], max_tokens=9),
        _req("stop-id", prompts[1], max_tokens=20, stop_token_ids=[free[6]]),  # ends on a stop token id
        _req("one", prompts[2], max_tokens=1),
        _req("stop-str", prompts[1], max_tokens=20, stop=[text]) if text.strip() else _req("s", prompts[3]),
        _req("min", prompts[4], max_tokens=14, min_tokens=8, stop_token_ids=[free[2]]),
        _req("long", prompts[5], max_tokens=25, presence_penalty=0.5),
    ]
    serial = await _serve(_engine(model_dir, ahead=False), reqs)
    engine = _engine(model_dir, ahead=True)
    ahead = await _serve(engine, reqs)
    for want, got in zip(serial, ahead, strict=True):
        assert _tokens(got) == _tokens(want)
        assert [e.text for e in got] == [e.text for e in want]
        assert got[-1].finish_reason == want[-1].finish_reason
    assert serial[1][-1].finish_reason == FinishReason.STOP
    runner = engine.runner
    assert isinstance(runner, CountingRunner)
    # nearly every decode row was computed ahead: only a row that sampled another row's stop id (which the
    # device cannot tell from its own) is decoded late
    assert runner.ahead_rows > 3 * runner.late_rows


@pytest.mark.parametrize("ending", ["stop-id", "stop-str", "length"])
async def test_a_finish_checkpoint_holds_exactly_the_tokens_its_state_consumed(
    model_dir: Path, ending: str
) -> None:
    prompt = _prompt(21, seed=7)
    free = await _greedy(model_dir, prompt, 16)
    table: dict[str, dict[str, Any]] = {
        "stop-id": {"stop_token_ids": [free[9]]},
        "stop-str": {"stop": [Tokenizer.from_pretrained(model_dir).decode(free[8:10])]},
        "length": {},
    }
    ends = table[ending]
    engine = _engine(model_dir, ahead=True, slots=2)
    events = await _serve(engine, [_req("r", prompt, max_tokens=16, session="s", **ends)])
    output = _tokens(events[0])
    fed_last = ending == "stop-str"  # the only ending the engine learns of after feeding the last token
    covered = prompt + tuple(output if fed_last else output[:-1])
    cache = engine.cache
    assert isinstance(cache, StateCache)
    lease = cache.lookup("anon", "s", covered)
    assert lease is not None and lease.position == len(covered)  # the finish checkpoint, at its full depth
    got = {k: v.clone() for k, v in engine.runner.slot_state(1).items()}
    cache.fetch(lease, out=got)
    cache.release(lease)
    ref = ModelRunner(load_model(model_dir)[1], max_slots=1)
    ref.prefill(list(covered), 0)
    for key, want in ref.capture(0).items():
        torch.testing.assert_close(got[key], want)  # the lossless tiers hold the very state
